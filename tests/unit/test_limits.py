"""simulref.limits: the up-front context check (issue 14, faults 4 and 5)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from simulref import limits
from simulref.decoder import translate
from simulref.limits import ContextError, Need, check_fits, context_length, guard_words
from simulref.testing import successor_model, tiny_model, tiny_tokenizer


def test_context_length_from_the_model_args_or_the_fallback():
    assert context_length(SimpleNamespace(args=SimpleNamespace(max_position_embeddings=8192)))\
        == 8192
    assert context_length(tiny_model("qwen2")) == 32768  # mlx-lm's qwen2 default
    llama = tiny_model("llama")  # declares none
    assert limits.declared_context_length(llama) is None
    assert context_length(llama) == limits.FALLBACK_CONTEXT
    assert context_length(object()) == limits.FALLBACK_CONTEXT


def test_a_known_source_fits_up_to_the_last_token():
    check_fits(Need(prompt=90, target=10), 100)
    with pytest.raises(ContextError, match="needs at least 101 tokens .* context of 100") as e:
        check_fits(Need(prompt=91, target=10), 100)
    assert e.value.argument == "source"
    with pytest.raises(ContextError, match="assumed context of 100 tokens"):
        check_fits(Need(prompt=91, target=10), 100, assumed=True)


def test_an_explicit_target_start_must_leave_room_for_the_target():
    check_fits(Need(prompt=10, target=10), 100, target_start=90)
    with pytest.raises(ContextError, match="expected at most 90") as e:
        check_fits(Need(prompt=10, target=10), 100, target_start=91)
    assert e.value.argument == "target_start"
    check_fits(None, 100, target_start=99)  # a live stream: room for one target token
    with pytest.raises(ContextError, match="positions up to 101"):
        check_fits(None, 100, target_start=100)


def test_the_guard_is_the_decoders():
    """A model that writes one-token words forever stops at the decoder's own guard."""
    tok = tiny_tokenizer()
    (word,) = tok.encode(" the")
    model = successor_model(len(tok.get_vocab()), {}, default=word)
    source = "a b c"
    trace = translate(model, tok, source, k=1)
    assert trace.finish_reason == "max_new_words"
    assert len(trace.writes) == guard_words(3) == 16


def test_need_of_counts_the_prompt_as_the_decoder_feeds_it():
    from simulref.prompt import DEFAULT_SYSTEM, assemble

    tok = tiny_tokenizer()
    prompt = assemble(tok, "The weather is nice", system=DEFAULT_SYSTEM)
    need = limits.need_of(tok, "The weather is nice".split(), system=DEFAULT_SYSTEM)
    assert need == Need(len(prompt.ids) + len(prompt.header_ids), guard_words(4))


def _examples(texts, tok=None):
    from simulref.finetune import make_examples

    return make_examples(tok or tiny_tokenizer(), texts, mode="streaming", ks=(2,))


def test_a_training_pair_past_the_context_is_refused_by_the_same_check():
    """Issue 21, item 8: train accepted a pair and a --target-start past the model's
    context that translate refuses; one check (check_fits) serves both."""
    pairs = [("the weather is nice", "il fait beau"), ("a b c d e f g h", "a b c d e f g h")]
    examples = _examples(pairs)
    longest = max(len(e.source) + len(e.inputs) for e in examples)
    limits.check_examples_fit(examples, longest)  # fits to the last token
    with pytest.raises(ContextError, match=r"valid_pairs\[1\]: the pair needs "
                                           rf"{longest} tokens .* context of {longest - 1}") as e:
        limits.check_examples_fit(examples, longest - 1, argument="valid_pairs")
    assert (e.value.argument, e.value.index) == ("valid_pairs", 1)


def test_a_training_target_start_past_the_context_is_refused():
    examples = _examples([("the weather is nice", "il fait beau")])
    target = len(examples[0].inputs)
    limits.check_examples_fit(examples, 1000, target_start=1000 - target)
    with pytest.raises(ContextError, match=rf"expected at most {1000 - target}") as e:
        limits.check_examples_fit(examples, 1000, target_start=1001 - target)
    assert e.value.argument == "target_start"
