"""Batch size from the device and a memory budget (simulref.batch_memory)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulref.batch_memory import (
    choose_batch_size,
    columns_per_row,
    kv_bytes_per_column,
    parse_size,
)
from simulref.testing import tiny_model


@given(n=st.integers(1, 10**6), unit=st.sampled_from(["", "B", "KiB", "MiB", "GiB", "kb",
                                                        "MB", "GB", "g", "m"]))
def test_sizes_parse(n, unit):
    factor = {"": 1, "b": 1, "kib": 1024, "mib": 2**20, "gib": 2**30, "kb": 1000,
              "mb": 10**6, "gb": 10**9, "g": 10**9, "m": 10**6}[unit.lower()]
    assert parse_size(f"{n}{unit}") == n * factor


@pytest.mark.parametrize("text", ["", "lots", "0", "-1GiB", "1 TB", "1.5.2MiB"])
def test_bad_sizes_say_what_is_expected(text):
    with pytest.raises(ValueError, match="expected a size such as 512MiB"):
        parse_size(text)


def test_a_column_is_every_layer_s_keys_and_values():
    model = tiny_model("llama")  # 2 layers, 2 kv heads of 16 dims, float32
    assert kv_bytes_per_column(model) == 2 * 2 * 2 * 16 * 4


def test_the_memory_budget_caps_the_batch():
    model = tiny_model("llama")
    per_row = kv_bytes_per_column(model) * columns_per_row(100)
    size, line = choose_batch_size(model, 100, wanted=32, max_memory=5 * per_row + 1)
    assert size == 5 and "capped by memory" in line and "--max-memory" in line
    size, line = choose_batch_size(model, 100, wanted=4, max_memory=5 * per_row)
    assert size == 4 and line.startswith("batch size 4 (asked")
    assert choose_batch_size(model, 100, wanted=8, max_memory=1)[0] == 1  # never below 1


def test_the_default_follows_the_device():
    size, line = choose_batch_size(tiny_model("llama"), 50)
    assert size >= 1 and line.startswith(f"batch size {size} (")
