"""How many sentences a batch decodes at once: a default from the device, capped so the
batch's KV cache fits a memory budget (no MLX import at module level)."""

from __future__ import annotations

import os
import re

# Per device kind: the rows that pay off. On this project's 2-core x86_64 CPU with
# OpenBLAS a forward of 16 rows costs 1.6-1.8x one row (32 rows 2.5-2.7x); without
# OpenBLAS the cost is linear in rows and batching buys nothing. A GPU takes far more.
CPU_BATCH = 16
GPU_BATCH = 32

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30}


def parse_size(text: str) -> int:
    """Bytes from ``"512MiB"``, ``"4GB"``, ``"2g"`` or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"expected a size such as 512MiB, 4GiB or 2GB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def kv_bytes_per_column(model) -> int:
    """Bytes one cache column takes in one row, every layer (keys and values)."""
    args = model.args
    layers = args.num_hidden_layers
    heads = getattr(args, "num_key_value_heads", None) or args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    return layers * 2 * heads * head_dim * _activation_bytes(model)


def _activation_bytes(model) -> int:
    """Bytes per value of the model's activations (its embedding's float type)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    for _, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            return value.dtype.size
    return 4


def columns_per_row(longest_prompt: int) -> int:
    """Columns a row's share of the buffer may span: its prompt, its target with the
    re-fed entries, and the padding of rows that joined later (a generous 4x)."""
    return 4 * longest_prompt + 64


def default_memory_budget() -> tuple[int, str]:
    """(bytes, where the figure comes from) the batch's KV cache may take."""
    import mlx.core as mx

    info = mx.device_info() if hasattr(mx, "device_info") else {}
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if info.get(key):
            return int(info[key]) // 4, f"a quarter of the device's {key}"
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 2**31
    return available // 4, "a quarter of the free memory"


def default_batch_size() -> tuple[int, str]:
    """(rows, why) for this device."""
    import mlx.core as mx

    if mx.default_device().type == mx.gpu:
        return GPU_BATCH, "GPU"
    from .blas import openblas_status

    status = openblas_status()
    if status["mapped"]:
        return CPU_BATCH, f"CPU with {'MKL' if status['kind'] == 'mkl' else 'OpenBLAS'}"
    return 1, ("CPU without OpenBLAS or MKL: batching buys nothing (apt-get install "
               "libopenblas0-pthread, or pip install mkl)")


def choose_batch_size(model, longest_prompt: int, *, wanted: int | None = None,
                      max_memory: int | None = None) -> tuple[int, str]:
    """(rows, a line saying why): ``wanted`` (default: :func:`default_batch_size`), capped
    so that ``rows`` rows of ``columns_per_row(longest_prompt)`` columns fit
    ``max_memory`` bytes (default: :func:`default_memory_budget`)."""
    size, why = (wanted, "asked") if wanted is not None else default_batch_size()
    budget, where = ((max_memory, "--max-memory") if max_memory is not None
                     else default_memory_budget())
    per_row = kv_bytes_per_column(model) * columns_per_row(longest_prompt)
    cap = max(1, budget // per_row)
    if size > cap:
        size, why = cap, f"{why}, capped by memory"
    line = (f"batch size {size} ({why}; KV cache up to {_gib(size * per_row)} "
            f"of {_gib(budget)}, {where})")
    return size, line


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
