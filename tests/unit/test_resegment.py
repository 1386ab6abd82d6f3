"""Resegmentation (OmniSTEval's SoftSegmenter, word level): cases and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulref.resegment import PUNCTUATION, assign_words, normalize_word, resegment, similarity


def test_similarity_is_jaccard_of_character_sets():
    assert similarity("chat", "chats") == 4 / 5
    assert similarity("abc", "cab") == 1.0
    assert similarity("ab", "cd") == 0.0
    assert similarity(".", ".") == 1.0
    assert similarity(".", "a") == float("-inf")  # punctuation never matches a word
    assert normalize_word("ﬁLE") == "file"  # NFKC, lower case


def test_a_perfect_output_is_cut_at_the_reference_boundaries():
    refs = ["Le chat dort .", "Il fait beau", "Oui"]
    words = " ".join(refs).split()
    assert resegment(refs, words) == [[0, 1, 2, 3], [4, 5, 6], [7]]


def test_unmatched_words_go_to_the_more_similar_neighbour():
    refs = ["le chat dort", "il fait beau"]
    # "dorts" matches "dort"; "zzz" (no match) stays with the previous sentence; "ilx"
    # is more like "il" than like "dort", so it and the run after it go forward.
    assert assign_words(refs, ["le", "chat", "dorts", "zzz", "il", "fait", "beau"]) == \
        [0, 0, 0, 0, 1, 1, 1]
    assert assign_words(refs, ["le", "chat", "ilx", "fait", "beau"]) == [0, 0, 1, 1, 1]


def test_a_leading_punctuation_token_that_matches_nothing_is_dropped():
    # As OmniSTEval: no previous reference word, and the next one is not punctuation.
    assert assign_words(["le chat"], [",", "le", "chat"]) == [None, 0, 0]
    assert resegment(["le chat"], [",", "le", "chat"]) == [[1, 2]]


def test_no_output_leaves_every_sentence_empty():
    assert resegment(["a b", "c"], []) == [[], []]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: resegment("a b", ["a"]), TypeError, "references must be a sequence"),
        (lambda: resegment(["a"], ["a b"]), ValueError, r"hypothesis_words\[0\] must be one"),
        (lambda: resegment(["a", 3], ["a"]), TypeError, r"references\[1\] must be a str"),
        (lambda: resegment(["", " "], ["a"]), ValueError, "references have no words"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


VOCABULARY = ["le", "la", "Le", "chat", "chats", "dort", "il", "fait", "beau", ".", ",", "-",
              "É", "été", "ﬁn", "fin", "a", "b", "ab"]
sentences = st.lists(st.sampled_from(VOCABULARY), min_size=1, max_size=6).map(" ".join)


@given(st.lists(sentences, min_size=1, max_size=5),
       st.lists(st.sampled_from(VOCABULARY), max_size=25))
def test_the_assignment_is_monotone_and_keeps_the_order(refs, words):
    assigned = assign_words(refs, words)
    kept = [s for s in assigned if s is not None]
    assert kept == sorted(kept)
    assert all(0 <= s < len(refs) for s in kept)
    segments = resegment(refs, words)
    assert [i for seg in segments for i in seg] == [i for i, s in enumerate(assigned)
                                                    if s is not None]


@given(st.lists(sentences, min_size=1, max_size=5),
       st.lists(st.sampled_from(VOCABULARY), max_size=25))
def test_only_a_leading_punctuation_mismatch_is_dropped(refs, words):
    assigned = assign_words(refs, words)
    first_ref = normalize_word(refs[0].lower().split()[0]) if refs[0].split() else None
    for i, s in enumerate(assigned):
        if s is None:
            assert all(t is None for t in assigned[:i])  # before every kept word
            word = normalize_word(words[i])
            assert first_ref is None or (word in PUNCTUATION) != (first_ref in PUNCTUATION)


@given(st.lists(sentences, min_size=1, max_size=5))
def test_a_perfect_output_resegments_to_the_references(refs):
    words = " ".join(refs).split()
    got = resegment(refs, words)
    assert [" ".join(words[i] for i in seg) for seg in got] == refs
