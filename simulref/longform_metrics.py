"""Long-form scores: resegment a document's output, then BLEU, chrF and the Long*
latencies per reference sentence, as OmniSTEval's ``longform`` command does (pure).

The clock is the source word index (``docs/longform.md``): a document is D consecutive
sentences joined into one stream; reference sentence ``s`` has ``offset_s`` = the index
of its first source word in the document and ``duration_s`` = its number of source
words. A hypothesis word's delay is the number of source words read (since the start of
the document) when it was written. After :func:`simulref.resegment.resegment` gives
every hypothesis word to one reference sentence, sentence ``s`` is scored like a
short-form instance whose delays are counted from its own offset (``d - offset_s``:
negative for a word written before the sentence began), whose source length is
``duration_s`` and whose recording end is ``end - offset_s`` (``end`` = the document's
last source word). The Long* scores are OmniSTEval's long-form ones:

- **LongYAAL**: YAAL cut at the end of the *document* instead of the sentence: the mean
  of ``d_i - (i-1) |X_s| / max(n_s, |Y_s|)`` over the sentence's words with
  ``d_i < end - offset_s``; undefined (skipped) when its first word is not before it.
- **LongAL, LongLAAL, LongAP, LongDAL**: SimulEval's AL, LAAL, AP and DAL (as in
  :mod:`simulref.metrics`) of those offset delays, which may be negative here.

Corpus scores are means over the sentences that have output (and, for LongYAAL, a
defined value); BLEU and chrF are sacrebleu's corpus scores of the resegmented
sentences, empty ones included. With ``elapsed`` (computation-aware emission times in
the same unit as the clock) the ``*_CA`` scores are the same functions of those.
``|Y_s|`` counts reference words with ``split()`` (OmniSTEval: ``split(" ")``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from simulref.metrics import _number, lagging  # one number check for both
from simulref.resegment import resegment

__all__ = [
    "LONG_METRICS",
    "Document",
    "Segment",
    "sentence_clock",
    "segments",
    "long_yaal",
    "long_al",
    "long_laal",
    "long_ap",
    "long_dal",
    "long_latency",
    "longform_scores",
]

LONG_METRICS = ("LongYAAL", "LongAL", "LongLAAL", "LongAP", "LongDAL")


@dataclass(frozen=True)
class Document:
    """One long-form run: the document's source and reference sentences (in order) and
    the output, one entry per hypothesis word. ``delays``: source words read (from the
    document's start) when each word was written; ``elapsed``: optional
    computation-aware emission times, in source words too."""

    sources: tuple[str, ...]
    references: tuple[str, ...]
    words: tuple[str, ...]
    delays: tuple[float, ...]
    elapsed: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("sources", "references", "words"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise TypeError(f"{name} must be a sequence of str, got {type(value).__name__}")
            object.__setattr__(self, name, tuple(value))
        if len(self.sources) != len(self.references):
            raise ValueError(f"sources and references must pair up: {len(self.sources)} "
                             f"sources, {len(self.references)} references")
        if not self.sources:
            raise ValueError("a document needs at least one sentence")
        for name in ("delays", "elapsed"):
            value = getattr(self, name)
            if value is None and name == "elapsed":
                continue
            value = _times(name, value)
            if len(value) != len(self.words):
                raise ValueError(f"{name} must hold one time per word ({len(self.words)}), "
                                 f"got {len(value)}")
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class Segment:
    """A reference sentence with the hypothesis words resegmentation gave it; times
    are counted from the sentence's offset."""

    reference: str
    prediction: str
    source_length: float
    delays: tuple[float, ...]
    elapsed: tuple[float, ...] | None
    to_end: float  # from the sentence's offset to the end of the document

    @property
    def reference_length(self) -> int:
        return len(self.reference.split())


def _times(name: str, values: object) -> tuple[float, ...]:
    """Finite, non-decreasing times; negative ones allowed (a word written before its
    sentence began has a negative offset delay)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    out = tuple(_number(f"{name}[{i}]", v) for i, v in enumerate(values))
    for i in range(1, len(out)):
        if out[i] < out[i - 1]:
            raise ValueError(f"{name} must be non-decreasing, got {name}[{i - 1}] = "
                             f"{values[i - 1]!r} > {name}[{i}] = {values[i]!r}")
    return out


def sentence_clock(sources: Sequence[str]) -> list[tuple[int, int]]:
    """``(offset, duration)`` of each source sentence in source words: the index of its
    first word in the joined document, and its word count."""
    if isinstance(sources, str) or not isinstance(sources, Sequence):
        raise TypeError(f"sources must be a sequence of str, got {type(sources).__name__}")
    clock = []
    offset = 0
    for i, source in enumerate(sources):
        if not isinstance(source, str):
            raise TypeError(f"sources[{i}] must be a str, got {type(source).__name__}")
        n = len(source.split())
        if n == 0:
            raise ValueError(f"sources[{i}] has no words: its duration would be 0")
        clock.append((offset, n))
        offset += n
    return clock


def segments(document: Document) -> list[Segment]:
    """The document's output resegmented: one :class:`Segment` per reference sentence."""
    if not isinstance(document, Document):
        raise TypeError(f"document must be a Document, got {type(document).__name__}")
    clock = sentence_clock(document.sources)
    end = max(offset + duration for offset, duration in clock)
    out = []
    for (offset, duration), reference, indices in zip(
            clock, document.references, resegment(document.references, document.words),
            strict=True):
        elapsed = (None if document.elapsed is None
                   else tuple(document.elapsed[i] - offset for i in indices))
        out.append(Segment(
            reference=reference,
            prediction=" ".join(document.words[i] for i in indices),
            source_length=float(duration),
            delays=tuple(document.delays[i] - offset for i in indices),
            elapsed=elapsed,
            to_end=float(end - offset),
        ))
    return out


# --- per-sentence latencies (offset delays, possibly negative) ----------------------------
# simulref.metrics refuses negative delays (a caller bug in short-form); here they are
# normal, so these take any finite non-decreasing delays and otherwise compute the same
# formulas (tests hold them to simulref.metrics where both apply).


def _args(delays, source_length, reference_length=None):
    d = _times("delays", delays)
    if not d:
        raise ValueError("delays is empty: latency is undefined for a sentence with no words")
    x = _number("source_length", source_length)
    if x <= 0:
        raise ValueError(f"source_length must be > 0, got {source_length!r}")
    if reference_length is None:
        return d, x
    y = _number("reference_length", reference_length)
    if y <= 0:
        raise ValueError(f"reference_length must be > 0, got {reference_length!r}")
    return d, x, y


def long_yaal(delays: Sequence[float], source_length: float, reference_length: float,
              to_end: float) -> float | None:
    """LongYAAL of one resegmented sentence: YAAL cut at ``to_end`` (the end of the
    document, from the sentence's offset) instead of at ``source_length``. None when the
    first word is not before the end (OmniSTEval skips the sentence)."""
    d, x, y = _args(delays, source_length, reference_length)
    end = _number("to_end", to_end)
    if d[0] >= end:
        return None
    y = max(len(d), y)
    lags = [di - i * x / y for i, di in enumerate(d) if di < end]
    return math.fsum(lags) / len(lags)


def long_al(delays: Sequence[float], source_length: float, reference_length: float) -> float:
    """AL (``|Y|`` = reference_length) of offset delays."""
    d, x, y = _args(delays, source_length, reference_length)
    return _al(d, x, y)


def long_laal(delays: Sequence[float], source_length: float, reference_length: float) -> float:
    """LAAL (``|Y| = max(n, reference_length)``) of offset delays."""
    d, x, y = _args(delays, source_length, reference_length)
    return _al(d, x, max(len(d), y))


_al = lagging  # AL's sum: the long-form scores check their own (offset) arguments


def long_ap(delays: Sequence[float], source_length: float, reference_length: float) -> float:
    """AP of offset delays: ``sum(d) / (|X| |Y|)``."""
    d, x, y = _args(delays, source_length, reference_length)
    return math.fsum(d) / (x * y)


def long_dal(delays: Sequence[float], source_length: float) -> float:
    """DAL of offset delays (step ``|X| / n``, the hypothesis length)."""
    d, x = _args(delays, source_length)
    step = x / len(d)
    g = d[0]
    lags = [g]
    for i in range(1, len(d)):
        g = max(d[i], g + step)
        lags.append(g - i * step)
    return math.fsum(lags) / len(lags)


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def long_latency(segments_: Sequence[Segment], *, computation_aware: bool = False
                 ) -> dict[str, float]:
    """Means over sentences of the Long* latencies (:data:`LONG_METRICS`; NaN where no
    sentence has a value). ``computation_aware``: of the ``elapsed`` times, keys
    ``LongYAAL_CA`` etc. A sentence without words is skipped."""
    scores: dict[str, list[float]] = {name: [] for name in LONG_METRICS}
    for n, seg in enumerate(segments_):
        if not isinstance(seg, Segment):
            raise TypeError(f"segments[{n}] must be a Segment, got {type(seg).__name__}")
        times = seg.elapsed if computation_aware else seg.delays
        if times is None:
            raise ValueError(f"segments[{n}] has no elapsed times: computation-aware "
                             "scores need Document.elapsed")
        if not times:
            continue
        x, y = seg.source_length, seg.reference_length
        if y == 0:
            raise ValueError(f"segments[{n}] has an empty reference")
        if (lag := long_yaal(times, x, y, seg.to_end)) is not None:
            scores["LongYAAL"].append(lag)
        scores["LongAL"].append(long_al(times, x, y))
        scores["LongLAAL"].append(long_laal(times, x, y))
        scores["LongAP"].append(long_ap(times, x, y))
        scores["LongDAL"].append(long_dal(times, x))
    suffix = "_CA" if computation_aware else ""
    return {name + suffix: _mean(values) for name, values in scores.items()}


def longform_scores(documents: Sequence[Document]) -> dict:
    """Corpus scores of long-form runs: every document resegmented, then BLEU and chrF
    over all its reference sentences and the Long* latencies (``*_CA`` too when every
    document has ``elapsed``). Also ``sentences`` and ``empty_segments`` (sentences that
    resegmentation left without a word)."""
    from simulref import quality

    if isinstance(documents, Document) or not isinstance(documents, Sequence) or not documents:
        raise ValueError("documents must be a non-empty sequence of Document")
    all_segments = [seg for document in documents for seg in segments(document)]
    hypotheses = [seg.prediction for seg in all_segments]
    references = [seg.reference for seg in all_segments]
    out: dict = {
        "BLEU": quality.corpus_bleu(hypotheses, references),
        "chrF": quality.corpus_chrf(hypotheses, references),
        "sentences": len(all_segments),
        "empty_segments": sum(not seg.delays for seg in all_segments),
        **long_latency(all_segments),
    }
    if all(document.elapsed is not None for document in documents):
        out |= long_latency(all_segments, computation_aware=True)
    return out
