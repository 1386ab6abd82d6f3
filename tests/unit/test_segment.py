"""Sentence segmentation of a growing source: the rule, its stability, the stream."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulref.segment import (
    ABBREVIATIONS,
    SentenceSplitter,
    is_boundary,
    sentence_ends,
    split_sentences,
)


def sentences_of(text: str) -> list[str]:
    closed, rest = split_sentences(text.split(), final=True)
    assert rest == ()
    return [" ".join(s) for s in closed]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The cat sat. The dog ran.", ["The cat sat.", "The dog ran."]),
        ("Is it? Yes! 42 people came.", ["Is it?", "Yes!", "42 people came."]),
        ("Wait... Then go.", ["Wait...", "Then go."]),
        ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
        ('It ended (badly.) "Why?" she asked.', ["It ended (badly.)", '"Why?" she asked.']),
        ("Ask Mr. Smith and Dr. Who now.", ["Ask Mr. Smith and Dr. Who now."]),
        ("See Fig. 3 and No. 5 here.", ["See Fig. 3 and No. 5 here."]),
        ("J. Smith wrote it.", ["J. Smith wrote it."]),
        ("Use e.g. Postgres or i.e. This.", ["Use e.g. Postgres or i.e. This."]),
        ("It is done. and then more.", ["It is done. and then more."]),  # lower case
        ("It was in 2019. The end.", ["It was in 2019.", "The end."]),
        ("Call Dr.! Now.", ["Call Dr.!", "Now."]),  # "!" is not an abbreviation's dot
        ("Stuff etc. The rest.", ["Stuff etc.", "The rest."]),
        ("3.5 is a number. Yes", ["3.5 is a number.", "Yes"]),
        ("no punctuation at all", ["no punctuation at all"]),
    ],
)
def test_the_rule_on_examples(text, expected):
    assert sentences_of(text) == expected


def test_every_listed_abbreviation_holds_the_sentence_open():
    for abbreviation in ABBREVIATIONS:
        assert not is_boundary(abbreviation.capitalize(), "Smith"), abbreviation
        assert not is_boundary(abbreviation, "5"), abbreviation


def test_the_last_sentence_stays_open_until_the_next_word_or_the_end():
    words = "The cat sat.".split()
    assert sentence_ends(words) == []  # "sat." may be followed by a lower-case word
    assert split_sentences(words) == ([], tuple(words))
    assert sentence_ends(words, final=True) == [3]
    assert sentence_ends([], final=True) == []


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: is_boundary("a b", "C"), ValueError, "word must be one word"),
        (lambda: is_boundary("a.", ""), ValueError, "next_word must be one word"),
        (lambda: is_boundary(3, "C"), TypeError, "word must be a str"),
        (lambda: sentence_ends("The cat."), TypeError, "words must be a sequence of str"),
        (lambda: sentence_ends(["a.", " B"]), ValueError, r"words\[1\] must be one word"),
        (lambda: SentenceSplitter().push("x y"), ValueError, "word must be one word"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# A vocabulary that exercises every branch: final punctuation, closers, openers,
# abbreviations, initials, acronyms, digits, lower and upper case.
VOCABULARY = ["the", "The", "cat.", "Cat.", "Mr.", "Dr.", "U.S.", "e.g.", "J.", "3.5", "2.",
              "42", "Yes!", "no?", '"Go."', "(see", "it.)", "Wait...", "etc.", "¿Qué?", "É",
              "and", "Dr.!", "."]
words_lists = st.lists(st.sampled_from(VOCABULARY), max_size=25)


@given(words_lists, st.data())
def test_a_closed_sentence_is_never_reopened(words, data):
    m = data.draw(st.integers(0, len(words)))
    prefix, _ = split_sentences(words[:m])
    full, _ = split_sentences(words)
    assert full[: len(prefix)] == prefix
    assert sentence_ends(words, final=True)[: len(prefix)] == sentence_ends(words[:m])


@given(words_lists, st.booleans())
def test_the_sentences_are_the_words(words, final):
    closed, rest = split_sentences(words, final=final)
    assert [w for s in closed for w in s] + list(rest) == words
    assert all(closed)  # no empty sentence
    assert (rest == ()) == (final or not words)
    if not final:  # only the last word can hold an open sentence's end
        assert len(rest) >= 1 or not words


@given(words_lists)
def test_the_stream_gives_the_same_sentences(words):
    splitter = SentenceSplitter()
    got = []
    for n, word in enumerate(words, start=1):
        got += splitter.push(word)
        closed, rest = split_sentences(words[:n])
        assert got == closed and splitter.open_words == rest
    got += splitter.finish()
    assert got == split_sentences(words, final=True)[0]
    assert splitter.finish() == [] and splitter.open_words == ()
