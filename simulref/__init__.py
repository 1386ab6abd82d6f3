"""simulref: reference implementation of LLM simultaneous translation on MLX.

The public API, re-exported. Names that need MLX (``load``, ``stream``, ``translate``,
``translate_batch``, ``train``) are imported on first use, so ``import simulref`` (and
``simulref.verify``, ``simulref.metrics``, ``simulref.prompt``, ``simulref.trace``,
``simulref.config``) work without MLX.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load": "simulref.models",
    "PRESETS": "simulref.models",
    "DEFAULT_PRESET": "simulref.models",
    "stream": "simulref.decoder",
    "translate": "simulref.decoder",
    "translate_batch": "simulref.batch",
    "stream_batch": "simulref.batch",
    "train": "simulref.finetune",
    "LoraConfig": "simulref.finetune",
    "ADAPTER_PRESETS": "simulref.adapters",
    "LAYOUTS": "simulref.config",
    "ENGINES": "simulref.config",
    "DecodeConfig": "simulref.config",
    "Feed": "simulref.decoder",
    "NEED_INPUT": "simulref.decoder",
    "WaitK": "simulref.policy",
    "ReadAll": "simulref.policy",
    "Confidence": "simulref.policy",
    "LocalAgreement": "simulref.policy",
    "Candidate": "simulref.policy",
    "parse_policy": "simulref.policy",
    "ChatFormat": "simulref.prompt",
    "DEFAULT_SYSTEM": "simulref.prompt",
    "Prompt": "simulref.prompt",
    "Template": "simulref.prompt",
    "assemble": "simulref.prompt",
    "discover_chat_format": "simulref.prompt",
    "template_for": "simulref.prompt",
    "Read": "simulref.trace",
    "Write": "simulref.trace",
    "DroppedEos": "simulref.trace",
    "BlankRun": "simulref.trace",
    "Finish": "simulref.trace",
    "Look": "simulref.trace",
    "Hypothesis": "simulref.trace",
    "Settings": "simulref.trace",
    "Trace": "simulref.trace",
    "read_traces": "simulref.trace",
    "write_traces": "simulref.trace",
    "render_compact": "simulref.trace",
    "latency_scores": "simulref.metrics",
    "corpus_bleu": "simulref.quality",
    "corpus_chrf": "simulref.quality",
    "check_prompt": "simulref.verify",
    "check_schedule": "simulref.verify",
    "check_trace": "simulref.verify",
    "check_policy": "simulref.verify",
    "compare_traces": "simulref.verify",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'simulref' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
