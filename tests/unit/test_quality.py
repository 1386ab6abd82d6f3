"""Quality: hypothesis clean-up, and BLEU / chrF against sacrebleu called directly."""

from __future__ import annotations

import pytest
import sacrebleu
from hypothesis import given
from hypothesis import strategies as st

from simulref.quality import (
    KNOWN_ASSISTANT_HEADERS,
    KNOWN_SPECIAL_TOKENS,
    clean_hypothesis,
    corpus_bleu,
    corpus_chrf,
    quality_scores,
)

# Natural text: letters (accents included), digits, punctuation, spaces. No "<", so no
# special token; the role words "assistant" and "model" may occur, never before "\n".
letters = st.sampled_from(list("abcdeéèçàôœABCÉ0123456789.,;:!?'-()«»"))
word = st.one_of(st.lists(letters, min_size=1, max_size=8).map("".join),
                 st.sampled_from(["assistant", "model", "Assistant", "user"]))
natural = st.lists(word, max_size=8).map(" ".join)
space = st.sampled_from(["", " ", "  ", "\n", " \n", "\t"])
tokens = st.sampled_from(KNOWN_SPECIAL_TOKENS)
headers = st.sampled_from(KNOWN_ASSISTANT_HEADERS)


# ------------------------------------------------------------------ clean_hypothesis


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        # The bug this guards against: the role word of the header leaked into every line.
        ("assistant\nLe chat dort.", "Le chat dort."),
        ("<|im_start|>assistant\nLe chat dort.<|im_end|>", "Le chat dort."),
        ("Le chat dort.<|im_end|>\n<|endoftext|>", "Le chat dort."),
        ("<|start_header_id|>assistant<|end_header_id|>\n\nDie Katze.<|eot_id|>", "Die Katze."),
        ("assistant\n\nDie Katze.", "Die Katze."),
        ("<start_of_turn>model\nDie Katze.<end_of_turn>", "Die Katze."),
        ("model\nDie Katze.", "Die Katze."),
        ("  <|endoftext|>assistant\nLe chat", "Le chat"),
        ("Le chat<|im_end|>Le chien", "Le chat Le chien"),
        ("Le chat <|im_end|> le chien", "Le chat le chien"),
        # Legitimate leading words stay.
        ("assistant de direction", "assistant de direction"),
        ("Assistant\nmanager", "Assistant\nmanager"),
        ("model T", "model T"),
        ("L'assistant\nest là", "L'assistant\nest là"),
        ("Le modèle <b>gras</b>", "Le modèle <b>gras</b>"),
        ("", ""),
        ("  \n ", ""),
        ("assistant\n", ""),  # an empty translation behind a leaked header
        ("<|im_start|>assistant\nassistant\n", "assistant"),  # after a header: the text
    ],
)
def test_clean_hypothesis_examples(raw, clean):
    assert clean_hypothesis(raw) == clean


def test_given_header_and_tokens():
    header = "[INST_END]helper:\n"
    assert clean_hypothesis("[INST_END]helper:\nBonjour [STOP]", special_tokens=["[STOP]"],
                            assistant_header=header) == "Bonjour"
    # Its residue, once "[INST_END]" is known as a special token, is "helper:" + newline.
    assert clean_hypothesis("helper:\nBonjour", special_tokens=["[INST_END]"],
                            assistant_header=header) == "Bonjour"
    # Without the header, "helper:" is just a word.
    assert clean_hypothesis("helper:\nBonjour") == "helper:\nBonjour"


@given(natural)
def test_natural_text_is_only_stripped(text):
    assert clean_hypothesis(text) == text.strip()
    # (a newline right after a leading role word would make it header debris: see below)
    assert clean_hypothesis(" \n" + text + " \t") == text.strip()


@given(space, headers, natural, st.lists(tokens, max_size=3), space)
def test_header_and_trailing_tokens_are_removed(lead, header, text, tail, trail):
    raw = lead + header + text + "".join(tail) + trail
    assert clean_hypothesis(raw) == text.strip()


@given(st.lists(st.one_of(natural, tokens, space), max_size=10).map("".join))
def test_no_special_token_survives_and_cleaning_is_idempotent(raw):
    once = clean_hypothesis(raw)
    assert not any(tok in once for tok in KNOWN_SPECIAL_TOKENS)
    assert clean_hypothesis(once) == once
    assert once == once.strip()


@given(natural, st.sampled_from(["assistant", "model"]), natural)
def test_a_role_word_is_removed_only_at_the_start_before_a_newline(before, role, after):
    kept = f"{before} {role}\n{after}" if before.strip() else f"x {role}\n{after}"
    assert clean_hypothesis(kept) == kept.strip()
    assert clean_hypothesis(f"{role} {after}") == f"{role} {after}".strip()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: clean_hypothesis(None), TypeError, "text must be a str"),
        (lambda: clean_hypothesis("x", special_tokens="<|x|>"), TypeError, "special_tokens"),
        (lambda: clean_hypothesis("x", special_tokens=[""]), TypeError, "special_tokens"),
        (lambda: clean_hypothesis("x", assistant_header=" "), TypeError, "assistant_header"),
    ],
)
def test_clean_hypothesis_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------ BLEU / chrF

HYPS = ["Le chat dort sur le tapis.", "Il fait beau aujourd'hui.", "Je veux acheter du pain."]
REFS = ["Le chat dort sur le tapis.", "Il fait très beau aujourd'hui.", "Je voudrais du pain."]


def test_corpus_scores_agree_with_sacrebleu():
    assert corpus_bleu(HYPS, REFS) == sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert corpus_chrf(HYPS, REFS) == sacrebleu.corpus_chrf(HYPS, [REFS]).score
    assert corpus_bleu(REFS, REFS) == pytest.approx(100.0)
    assert 0 < corpus_bleu(HYPS, REFS) < 100


@given(st.lists(st.tuples(natural, natural), min_size=1, max_size=5))
def test_corpus_scores_agree_with_sacrebleu_on_random_text(pairs):
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    assert corpus_bleu(hyps, refs) == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert corpus_chrf(hyps, refs) == sacrebleu.corpus_chrf(hyps, [refs]).score


def test_quality_scores_carry_the_signatures():
    got = quality_scores(HYPS, REFS)
    assert got["BLEU"] == corpus_bleu(HYPS, REFS)
    assert got["chrF"] == corpus_chrf(HYPS, REFS)
    assert got["BLEU_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|")
    assert got["chrF_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|")
    assert got["BLEU_signature"].endswith(f"version:{sacrebleu.__version__}")


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: corpus_bleu(["a"], ["a", "b"]), ValueError, "same length, got 1 and 2"),
        (lambda: corpus_chrf([], []), ValueError, "at least one sentence"),
        (lambda: corpus_bleu("a b", "a b"), TypeError, "hypotheses must be a sequence of str"),
        (lambda: corpus_bleu(["a"], [["a"]]), TypeError, r"references\[0\] must be a str"),
        (lambda: quality_scores(["a"], [None]), TypeError, r"references\[0\]"),
    ],
)
def test_corpus_scores_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
