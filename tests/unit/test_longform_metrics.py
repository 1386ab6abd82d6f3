"""Long-form scores: the clock, the Long* latencies, their ties to simulref.metrics."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulref import metrics
from simulref.longform_metrics import (
    LONG_METRICS,
    Document,
    Segment,
    long_al,
    long_ap,
    long_dal,
    long_laal,
    long_latency,
    long_yaal,
    longform_scores,
    segments,
    sentence_clock,
)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def test_the_clock_counts_source_words():
    assert sentence_clock(["a b c", "d e", "f"]) == [(0, 3), (3, 2), (5, 1)]
    with pytest.raises(ValueError, match=r"sources\[1\] has no words"):
        sentence_clock(["a", "  "])


def test_a_two_sentence_document_by_hand():
    doc = Document(sources=("a b c", "d e"), references=("x y z", "u v"),
                   words=("x", "y", "z", "u", "v"), delays=(1, 2, 3, 4, 5))
    first, second = segments(doc)
    assert first == Segment("x y z", "x y z", 3.0, (1.0, 2.0, 3.0), None, 5.0)
    assert second == Segment("u v", "u v", 2.0, (1.0, 2.0), None, 2.0)
    # LongYAAL of sentence 1 is cut at the document's end (5 words from its offset), not
    # at its own: all three words count, lags 1, 1, 1. Sentence 2: only its first word.
    assert close(long_yaal(first.delays, 3, 3, first.to_end), 1.0)
    assert close(long_yaal(second.delays, 2, 2, second.to_end), 1.0)
    got = longform_scores([doc])
    assert close(got["LongYAAL"], 1.0) and close(got["LongAL"], 1.0)
    assert close(got["LongAP"], ((1 + 2 + 3) / 9 + (1 + 2) / 4) / 2)
    assert got["chrF"] == pytest.approx(100.0) and got["sentences"] == 2
    assert got["empty_segments"] == 0 and "LongYAAL_CA" not in got


def test_a_word_written_early_has_a_negative_delay_in_its_sentence():
    # "u" (sentence 2) is written after 2 source words, before sentence 2 began (at 3).
    doc = Document(sources=("a b c", "d e"), references=("x y z", "u v"),
                   words=("x", "y", "z", "u", "v"), delays=(1, 1, 2, 2, 5),
                   elapsed=(1.5, 1.5, 2.5, 2.5, 5.5))
    second = segments(doc)[1]
    assert second.delays == (-1.0, 2.0) and second.elapsed == (-0.5, 2.5)
    assert close(long_yaal(second.delays, 2, 2, second.to_end), -1.0)  # 2 >= end: cut
    got = longform_scores([doc])
    assert set(got) >= {f"{name}_CA" for name in LONG_METRICS}


def test_a_sentence_without_output_counts_for_quality_not_latency():
    doc = Document(sources=("a b", "c d"), references=("x y", "u v"), words=("x", "y"),
                   delays=(1, 2))
    got = longform_scores([doc])
    assert got["empty_segments"] == 1 and got["sentences"] == 2
    assert close(got["LongAL"], long_al([1, 2], 2, 2))  # the mean over sentence 1 only
    assert got["chrF"] < 100


def test_latency_of_no_words_is_nan():
    empty = Segment("x", "", 1.0, (), (), 1.0)
    assert all(math.isnan(v) for v in long_latency([empty]).values())
    assert set(long_latency([empty], computation_aware=True)) == {
        f"{name}_CA" for name in LONG_METRICS}


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: Document(("a",), ("x", "y"), (), ()), ValueError, "must pair up"),
        (lambda: Document((), (), (), ()), ValueError, "at least one sentence"),
        (lambda: Document(("a",), ("x",), ("x",), ()), ValueError, "one time per word"),
        (lambda: Document(("a",), ("x",), ("x", "y"), (2, 1)), ValueError, "non-decreasing"),
        (lambda: Document(("a",), ("x",), ("x",), None), TypeError, "delays must be a seq"),
        (lambda: Document("a", ("x",), (), ()), TypeError, "sources must be a sequence"),
        (lambda: long_yaal([], 1, 1, 1), ValueError, "delays is empty"),
        (lambda: long_al([1], 0, 1), ValueError, "source_length must be > 0"),
        (lambda: long_ap([1], 1, 0), ValueError, "reference_length must be > 0"),
        (lambda: long_dal([float("nan")], 1), ValueError, "finite"),
        (lambda: long_latency([Segment("x", "x", 1.0, (1.0,), None, 1.0)],
                              computation_aware=True), ValueError, "no elapsed"),
        (lambda: longform_scores([]), ValueError, "non-empty sequence of Document"),
        (lambda: segments("doc"), TypeError, "document must be a Document"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@st.composite
def schedules(draw):
    x = draw(st.integers(1, 12))
    n = draw(st.integers(1, 14))
    d = sorted(draw(st.lists(st.integers(0, x + 3), min_size=n, max_size=n)))
    return d, x, draw(st.integers(1, 14))


@given(schedules())
def test_on_non_negative_delays_they_are_simulref_metrics(case):
    d, x, y = case
    assert close(long_al(d, x, y), metrics.al(d, x, y))
    assert close(long_laal(d, x, y), metrics.laal(d, x, y))
    assert close(long_ap(d, x, y), metrics.ap(d, x, y))
    assert close(long_dal(d, x), metrics.dal(d, x))
    short = metrics.yaal(d, x, y)
    long = long_yaal(d, x, y, x)  # the document ends with the sentence: short-form YAAL
    assert (short is None) == (long is None) and (short is None or close(short, long))


@given(schedules(), st.integers(0, 10), st.integers(-5, 5))
def test_long_yaal_counts_more_words_as_the_document_goes_on(case, more, shift):
    d, x, y = case
    d = [di + shift for di in d]  # offset delays may be negative
    got = long_yaal(d, x, y, x + more)
    counted = [di for di in d if di < x + more]
    assert (got is None) == (not counted or d[0] >= x + more)
    if got is not None:
        n = len(counted)
        step = x / max(len(d), y)
        assert close(got, sum(di - i * step for i, di in enumerate(counted)) / n)


VOCABULARY = ["le", "chat", "dort", "il", "fait", "beau", ".", ",", "oui"]


@given(st.lists(st.lists(st.sampled_from(VOCABULARY), min_size=1, max_size=5),
                min_size=1, max_size=4), st.data())
def test_a_perfect_wait_1_output_of_a_document(refs, data):
    # Sources and references of the same lengths; word j written after j + 1 source words.
    sources = tuple(" ".join(f"s{j}" for j in range(len(r))) for r in refs)
    references = tuple(" ".join(r) for r in refs)
    words = tuple(w for r in refs for w in r)
    total = len(words)
    doc = Document(sources, references, words, tuple(min(j + 1, total) for j in range(total)))
    got = segments(doc)
    assert [seg.prediction for seg in got] == list(references)
    scores = longform_scores([doc])
    assert scores["chrF"] == pytest.approx(100.0) and scores["empty_segments"] == 0
    # Every sentence lags exactly one word behind its own start.
    assert close(scores["LongAL"], 1.0) and close(scores["LongLAAL"], 1.0)
    if len(refs) > 1 or len(refs[0]) > 1:  # else the only word comes at the very end
        assert close(scores["LongYAAL"], 1.0)
    else:
        assert math.isnan(scores["LongYAAL"])
    for seg in got:
        assert seg.delays == tuple(float(k + 1) for k in range(len(seg.delays)))
