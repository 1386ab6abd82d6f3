"""Documents for eval --longform: D consecutive sentence pairs as one stream."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulref.documents import SourceDocument, build_documents
from simulref.evaluate import Pair
from simulref.longform_metrics import longform_scores

words = st.text(alphabet="abcé.,", min_size=1, max_size=4)
# Sources as a dataset may hold them: words apart by one space or more (the stream reads
# them one space apart).
texts = st.tuples(st.lists(words, min_size=1, max_size=5), st.sampled_from([" ", "  "])).map(
    lambda t: t[1].join(t[0]))
pairs_lists = st.lists(st.tuples(texts, texts), min_size=1, max_size=12)


def test_three_documents_of_two_with_the_remainder_last():
    pairs = [(f"s{i} x", f"r{i}") for i in range(5)]
    docs = build_documents(pairs, 2)
    assert [d.indices for d in docs] == [(0, 1), (2, 3), (4,)]
    assert docs[1] == SourceDocument(1, (2, 3), ("s2 x", "s3 x"), ("r2", "r3"))
    assert docs[1].text == "s2 x s3 x"
    assert docs[1].clock == [(0, 2), (2, 2)]


def test_pairs_from_a_dataset_file():
    pairs = [Pair("The  cat", "Le chat", 1), Pair("sleeps .", "dort .", 2)]
    (doc,) = build_documents(pairs, 4)
    assert doc.text == "The cat sleeps ."  # one space between words, as the stream reads
    out = doc.output(("Le", "chat", "dort", "."), (1, 2, 3, 4), (1.5, 2.5, 3.5, 4.5))
    assert out.sources == ("The  cat", "sleeps .") and out.elapsed == (1.5, 2.5, 3.5, 4.5)
    assert longform_scores([out])["chrF"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: build_documents([("a", "b")], 0), ValueError, "doc_size: expected an int >= 1"),
        (lambda: build_documents([("a", "b")], True), TypeError, "doc_size"),
        (lambda: build_documents([], 2), ValueError, "pairs is empty"),
        (lambda: build_documents("ab", 2), TypeError, "pairs must be a sequence"),
        (lambda: build_documents([("a", "b"), ("a",)], 2), TypeError, r"pairs\[1\] must be"),
        (lambda: build_documents([("a", " ")], 2), ValueError, r"pairs\[0\] has an empty ref"),
        (lambda: build_documents([(1, "b")], 2), TypeError, r"pairs\[0\] source must be a str"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@given(pairs_lists, st.integers(1, 15))
def test_documents_cover_every_pair_once_in_order(pairs, size):
    docs = build_documents(pairs, size)
    assert [i for d in docs for i in d.indices] == list(range(len(pairs)))
    assert [(s, r) for d in docs for s, r in zip(d.sources, d.references, strict=True)] == pairs
    assert [d.index for d in docs] == list(range(len(docs)))
    # With the cover above, these two fix the last document at 1..size pairs.
    assert all(len(d.indices) == size for d in docs[:-1])
    assert len(docs) == -(-len(pairs) // size)


@given(pairs_lists, st.integers(1, 15))
def test_the_clock_points_at_each_sentence_in_the_stream(pairs, size):
    for doc in build_documents(pairs, size):
        assert "  " not in doc.text  # one space between words, whatever the sources held
        stream = doc.text.split()
        assert stream == [w for s in doc.sources for w in s.split()]
        for (offset, duration), source in zip(doc.clock, doc.sources, strict=True):
            assert stream[offset:offset + duration] == source.split()


@given(pairs_lists)
def test_documents_of_one_sentence_are_the_short_form_sentences(pairs):
    docs = build_documents(pairs, 1)
    assert [(d.sources[0], d.references[0]) for d in docs] == pairs


def test_a_written_word_with_whitespace_inside_is_scored_as_its_pieces():
    """A model may write one word whose tokens hold a newline (``":\\n\\nVérifiez"``): the
    output has its pieces, each with its delay, and the resegmenter can score it."""
    (document,) = build_documents([("check the file", "vérifiez le fichier")], 1)
    output = document.output(["Voici:\n\n\"Vérifiez", "le", "fichier"], [1, 2, 3],
                             elapsed=[1.5, 2.5, 3.5])
    assert output.words == ("Voici:", "\"Vérifiez", "le", "fichier")
    assert output.delays == (1, 1, 2, 3) and output.elapsed == (1.5, 1.5, 2.5, 3.5)
    assert longform_scores([output])["sentences"] == 1
    with pytest.raises(ValueError, match="delays"):
        document.output(["a", "b"], [1])
