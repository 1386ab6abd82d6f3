"""LoRA adapters: mlx-lm adapter directories applied to a loaded model, and the
adapter presets shipped in the package (a base preset + an adapter directory).

An adapter directory is what ``simulref train`` writes and what ``mlx_lm.load(...,
adapter_path=...)`` reads: ``adapters.safetensors`` + ``adapter_config.json``. It is
applied with mlx-lm's own ``load_adapters`` (LoRA layers on the configured blocks, then
the weights; a tensor that does not fit the model is refused).

A LoRA trained on a GGUF preset fits that preset: GGUF llama files store Q/K permuted for
interleaved RoPE, so the same model loaded from Hugging Face weights has other q/k
projections and the adapter's q/k parts would not match them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")


@dataclass(frozen=True)
class AdapterPreset:
    name: str
    base: str  # a model preset (simulref.download.PRESETS)
    directory: str  # under simulref/data/adapters/
    description: str

    @property
    def path(self) -> Path:
        return Path(__file__).parent / "data" / "adapters" / self.directory


ADAPTER_PRESETS: dict[str, AdapterPreset] = {
    p.name: p for p in (
        AdapterPreset(
            name="smollm2-135m-simul-fr",
            base="smollm2-135m",
            directory="smollm2-135m-simul-fr",
            description="smollm2-135m + a streaming-trained LoRA (wait-k 1/3/5, en->fr, "
                        "postgres messages; see README)",
        ),
        AdapterPreset(
            name="qwen2.5-coder-0.5b-simul-fr",
            base="qwen2.5-coder-0.5b",
            directory="qwen2.5-coder-0.5b-simul-fr",
            description="qwen2.5-coder-0.5b + a streaming-trained LoRA (wait-k 1/3/5, "
                        "en->fr, postgres messages, 100 steps; see README)",
        ),
    )
}


def check_adapter(path: str | os.PathLike) -> Path:
    """The adapter directory, or FileNotFoundError naming what is missing."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"adapter: no such directory: {path}")
    missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"adapter: {path} is not an mlx-lm adapter directory "
                                f"(missing {', '.join(missing)})")
    return path


def adapter_sha256(path: str | os.PathLike) -> str:
    """The sha256 of an adapter directory's files (:data:`ADAPTER_FILES`, each with its
    name and length): the same adapter wherever it lies, another one once retrained."""
    path = check_adapter(path)
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        data = (path / name).read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


class AdapterError(ValueError):
    """An adapter directory that cannot be applied: a weights file that is not a readable
    safetensors file (truncated, corrupt), a config that is not an mlx-lm adapter config,
    or weights that do not fit the model (an adapter for another base model). The message
    is one line and names the file; the command line maps it to exit code 2."""


FINE_TUNE_TYPES = ("lora", "dora", "full")


def _check_config(config, path: Path) -> dict:
    """``config`` (adapter_config.json, parsed) has the fields ``load_adapters`` uses,
    of the right kinds; else AdapterError naming the field."""
    def bad(why: str) -> AdapterError:
        return AdapterError(f"adapter: {path}: not an mlx-lm adapter config ({why})")

    if not isinstance(config, dict):
        raise bad(f"expected a JSON object, got {type(config).__name__}")
    kind = config.get("fine_tune_type", "lora")
    if kind not in FINE_TUNE_TYPES:
        raise bad(f"fine_tune_type: expected one of {', '.join(FINE_TUNE_TYPES)}, "
                  f"got {kind!r}")
    if kind == "full":
        return config
    layers = config.get("num_layers")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise bad(f"num_layers: expected an int >= 1, got {layers!r}")
    lora = config.get("lora_parameters")
    if not isinstance(lora, dict):
        raise bad(f"lora_parameters: expected an object with rank, scale and dropout, "
                  f"got {lora!r}")
    rank = lora.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise bad(f"lora_parameters.rank: expected an int >= 1, got {rank!r}")
    for name in ("scale", "dropout"):
        value = lora.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"lora_parameters.{name}: expected a number, got {value!r}")
    return config


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(config, weights)`` of an adapter directory, checked without a model: the config
    has mlx-lm's fields and the weights file is a whole safetensors file. Raises
    FileNotFoundError (:func:`check_adapter`) or :class:`AdapterError`."""
    import mlx.core as mx

    path = check_adapter(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapters.safetensors"
    try:
        config = json.loads(config_file.read_text("utf-8"))
    except UnicodeDecodeError:
        raise AdapterError(f"adapter: {config_file}: not UTF-8 text") from None
    except ValueError as error:
        raise AdapterError(f"adapter: {config_file}: not JSON ({error})") from None
    _check_config(config, config_file)
    try:
        # mx.load reads the header and checks every tensor's extent against the file's
        # size, so a truncated file is caught here, before any model is touched.
        weights = mx.load(str(weights_file))
    except (RuntimeError, ValueError, OSError) as error:
        why = " ".join(str(error).split()) or type(error).__name__
        raise AdapterError(f"adapter: {weights_file}: not a readable safetensors file, "
                           f"truncated or corrupt ({why})") from None
    if not isinstance(weights, dict) or not weights:
        raise AdapterError(f"adapter: {weights_file}: holds no tensors")
    return config, weights


def _misfit(path: Path, config: dict, weights: dict, model) -> AdapterError | None:
    """The one-line error when ``weights`` (an adapter's) do not fit ``model`` once its
    LoRA layers are added, as ``load_adapters`` checks them; None when they fit."""
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    if config.get("fine_tune_type", "lora") != "full":
        params = {n: p for n, p in params.items() if n.rsplit(".", 1)[-1] in
                  ("lora_a", "lora_b", "m")}
    wrong = [(n, w) for n, w in weights.items()
             if n not in params or tuple(w.shape) != tuple(params[n].shape)]
    if not wrong:
        return None
    name, w = wrong[0]
    example = (f"{name}: not an adapter parameter of the model" if name not in params
               else f"{name}: shape {tuple(w.shape)}, the model's {tuple(params[name].shape)}")
    base = (config.get("simulref") or {}).get("model") if isinstance(
        config.get("simulref"), dict) else None
    trained = f"; it was trained on {base!r}" if base else ""
    return AdapterError(
        f"adapter: {path / 'adapters.safetensors'} does not fit this model: {len(wrong)} of "
        f"its {len(weights)} tensors do not match (first: {example}){trained}; an adapter "
        f"applies to the base model it was trained on")


def apply_adapter(model, path: str | os.PathLike):
    """Add the LoRA layers of the adapter in ``path`` to ``model`` and load its weights
    (mlx-lm's ``load_adapters``); the model is put in eval mode. Returns the model.
    Raises :class:`AdapterError` (one line, naming the file) for a damaged adapter (checked
    before ``model`` is touched) or one that does not fit ``model`` (then ``model`` may
    already carry the LoRA layers: load it again before using it)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    path = check_adapter(path)
    config, weights = read_adapter(path)
    kind = config.get("fine_tune_type", "lora")
    # What mlx-lm's load_adapters does, with its checks turned into one-line errors
    # (its own message lists every tensor: hundreds of lines for another base model).
    if kind != "full":
        try:
            linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"],
                                  use_dora=kind == "dora")
        except (KeyError, TypeError, ValueError) as error:
            raise AdapterError(f"adapter: {path / 'adapter_config.json'}: its LoRA layers do "
                               f"not apply to this model ({error})") from None
    misfit = _misfit(path, config, weights, model)
    if misfit is not None:
        raise misfit
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    return model
