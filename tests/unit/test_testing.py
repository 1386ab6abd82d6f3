"""simulref.testing.successor_model: the scripted stand-in model the goldens rely on."""

from __future__ import annotations

import mlx.core as mx
import pytest

from simulref.testing import successor_model


def test_it_predicts_the_successor_of_every_token_fed_and_fills_its_cache():
    model = successor_model(10, {1: 4, 4: 7}, default=2)
    (cache,) = model.make_cache()
    logits = model(mx.array([[1, 4, 7, 0]]), cache=[cache])
    assert mx.argmax(logits, axis=-1).tolist() == [[4, 7, 2, 2]]
    assert cache.offset == 4  # the decoder's bookkeeping sees a real KV cache grow
    assert model(mx.array([[4]]), cache=[cache]).shape == (1, 1, 10)
    assert cache.offset == 5


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, {}, 0), "vocab_size: expected an int >= 1"),
        ((True, {}, 0), "vocab_size"),
        ((5, {}, 5), r"default: expected a token id in \[0, 5\)"),
        ((5, {9: 1}, 0), "successors key"),
        ((5, {1: -1}, 0), r"successors\[1\]"),
        ((5, {1: 1.0}, 0), r"successors\[1\]"),
    ],
)
def test_bad_arguments_name_themselves(args, match):
    with pytest.raises(ValueError, match=match):
        successor_model(*args)


def test_the_public_surface_is_the_tiny_models():
    import simulref.testing as testing

    public = {name for name in vars(testing) if not name.startswith("_")}
    assert {"tiny_model", "tiny_tokenizer", "successor_model", "CHATML_TEMPLATE"} <= public
    assert "write_tiny_gguf" not in public  # a test fixture: tests/unit/tiny_gguf.py
