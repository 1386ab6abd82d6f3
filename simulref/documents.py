"""Documents for long-form evaluation: D consecutive sentence pairs as one stream (pure).

``simulref eval --longform --doc-size D`` decodes each document as one stream and scores
it with :mod:`simulref.longform_metrics`. The documents cover every sentence of the data
once, in order (the last one holds the remainder, 1..D sentences), so long-form scores
are over the same sentences as the short-form runs. A document's stream is its sources
joined by single spaces: its words are the sentences' words in order, so sentence ``s``
starts at source word ``offset_s`` of :func:`simulref.longform_metrics.sentence_clock`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from simulref.checks import check_int
from simulref.longform_metrics import Document, sentence_clock

__all__ = ["SourceDocument", "build_documents"]


@dataclass(frozen=True)
class SourceDocument:
    """Sentences ``indices`` of the data (0-based, consecutive) as one stream."""

    index: int
    indices: tuple[int, ...]
    sources: tuple[str, ...]
    references: tuple[str, ...]

    @property
    def text(self) -> str:
        """The stream to decode: the sources joined by single spaces."""
        return " ".join(" ".join(source.split()) for source in self.sources)

    @property
    def clock(self) -> list[tuple[int, int]]:
        """``(offset, duration)`` of each sentence in source words of :attr:`text`."""
        return sentence_clock(self.sources)

    def output(self, words: Sequence[str], delays: Sequence[float],
               elapsed: Sequence[float] | None = None) -> Document:
        """The document's long-form output, ready for :mod:`simulref.longform_metrics`:
        one entry per hypothesis word, delays in source words read from the stream's
        start (``elapsed`` likewise, with computation). A written word with whitespace
        inside (a model may write ``":\n\nVérifiez"`` as one word: its tokens open no
        word) is its pieces, each with the word's delay: the scorer aligns words."""
        times = [None] * len(words) if elapsed is None else list(elapsed)
        if not len(words) == len(delays) == len(times):
            raise ValueError(f"delays, elapsed: expected one per word ({len(words)}), got "
                             f"{len(delays)} and {len(times)}")
        split = [(piece, d, e) for w, d, e in zip(words, delays, times, strict=True)
                 for piece in w.split()]
        return Document(self.sources, self.references, tuple(p for p, _, _ in split),
                        tuple(d for _, d, _ in split),
                        None if elapsed is None else tuple(e for _, _, e in split))


def _pair(n: int, item: object) -> tuple[str, str]:
    if hasattr(item, "source") and hasattr(item, "reference"):  # simulref.evaluate.Pair
        source, reference = item.source, item.reference
    elif isinstance(item, tuple) and len(item) == 2:
        source, reference = item
    else:
        raise TypeError(f"pairs[{n}] must be a (source, reference) tuple or a Pair, "
                        f"got {type(item).__name__}")
    for name, text in (("source", source), ("reference", reference)):
        if not isinstance(text, str):
            raise TypeError(f"pairs[{n}] {name} must be a str, got {type(text).__name__}")
        if not text.split():
            raise ValueError(f"pairs[{n}] has an empty {name}")
    return source, reference


def build_documents(pairs: Sequence, doc_size: int) -> list[SourceDocument]:
    """Consecutive ``doc_size`` sentence pairs per document, in order; the last document
    holds what is left (``len(pairs) % doc_size`` pairs, if not 0). ``pairs``:
    ``(source, reference)`` tuples or :class:`simulref.evaluate.Pair`."""
    size = check_int("doc_size", doc_size, minimum=1)
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"pairs must be a sequence of (source, reference), got "
                        f"{type(pairs).__name__}")
    checked = [_pair(n, item) for n, item in enumerate(pairs)]
    if not checked:
        raise ValueError("pairs is empty: no document to build")
    documents = []
    for start in range(0, len(checked), size):
        chunk = checked[start:start + size]
        documents.append(SourceDocument(
            index=len(documents),
            indices=tuple(range(start, start + len(chunk))),
            sources=tuple(s for s, _ in chunk),
            references=tuple(r for _, r in chunk),
        ))
    return documents
