"""simulref outputs in the input formats of the ``omnisteval`` command (pure; no MLX).

So that the official scorer of the IWSLT simultaneous track can be run on our outputs
(and is, in the cross-check tests). The functions return JSON-ready values; the caller
writes them (one JSON object per line for the ``.jsonl`` files, ``json.dump`` for the
segmentation, one reference per line for the references).

- ``omnisteval shortform --hypothesis_file H.jsonl --ref_sentences_file R.txt
  --word_level``: :func:`shortform_instance` per sentence (SimulEval's ``instances.log``
  fields). Times are in source words; with a word duration, ``elapsed`` holds the
  computation-aware emission times in source words too (``d_i + c_i / w``), since
  OmniSTEval scores both against the one ``source_length``.
- ``omnisteval longform --speech_segmentation S.json --ref_sentences_file R.txt
  --hypothesis_file H.jsonl --word_level``: :func:`longform_inputs` of the documents.
  OmniSTEval reads the segmentation's offsets and durations as seconds and multiplies
  them by 1000, and the hypothesis times as milliseconds; the segmentation here is in
  source words and the times are in thousandths of a source word to match, so its
  latencies come out as 1000 times simulref's (LongAP, a ratio, is the same).
"""

from __future__ import annotations

from collections.abc import Sequence

from simulref import metrics
from simulref.longform_metrics import Document, sentence_clock
from simulref.trace import Trace, Write

__all__ = ["MILLI", "shortform_instance", "longform_inputs"]

MILLI = 1000  # OmniSTEval's seconds-to-milliseconds factor on the segmentation


def shortform_instance(trace: Trace, reference: str, *,
                       word_duration: float | None = None, start: float = 0.0) -> dict:
    """One line of a SimulEval-style ``instances.log`` for ``trace``: ``prediction``,
    ``reference``, ``source_length`` (source words), ``delays`` (per hypothesis word, as
    :func:`simulref.metrics.hypothesis_delays` counts them) and, with ``word_duration``,
    ``elapsed`` (computation-aware, in source words; times counted from ``start``)."""
    if not isinstance(reference, str):
        raise TypeError(f"reference must be a str, got {type(reference).__name__}")
    hyp = metrics.hypothesis_delays(trace)
    # The words the delays count (every Write split on whitespace), not clean_hypothesis's
    # text: OmniSTEval pairs the prediction's words with the delays one to one.
    words = [w for e in trace.events if isinstance(e, Write) for w in e.text.split()]
    line = {"prediction": " ".join(words),
            "reference": reference, "source_length": len(trace.source_words),
            "delays": [d for d, _ in hyp]}
    if word_duration is not None:
        if hyp:
            elapsed, _ = metrics.computation_aware_delays(trace, word_duration, start=start)
            line["elapsed"] = [e / word_duration for e in elapsed]
        else:
            line["elapsed"] = []
    return line


def longform_inputs(documents: Sequence[Document], *, names: Sequence[str] | None = None
                    ) -> tuple[list[dict], list[str], list[dict]]:
    """``(segmentation, references, hypotheses)`` for ``omnisteval longform``: one
    segmentation entry (``wav``, ``offset``, ``duration``, in source words) and one
    reference per sentence, one hypothesis line (``source``, ``prediction``, ``delays``,
    and ``elapsed`` when the document has it, in thousandths of a source word) per
    document. ``names``: the documents' recording names (default ``doc{N}.wav``)."""
    if isinstance(documents, Document) or not isinstance(documents, Sequence):
        raise TypeError("documents must be a sequence of Document")
    if names is None:
        names = [f"doc{n}.wav" for n in range(len(documents))]
    if len(names) != len(documents) or len(set(names)) != len(names):
        raise ValueError(f"names must be {len(documents)} distinct names, one per document")
    segmentation: list[dict] = []
    references: list[str] = []
    hypotheses: list[dict] = []
    for n, (document, name) in enumerate(zip(documents, names, strict=True)):
        if not isinstance(document, Document):
            raise TypeError(f"documents[{n}] must be a Document, got {type(document).__name__}")
        for (offset, duration), reference in zip(sentence_clock(document.sources),
                                                 document.references, strict=True):
            segmentation.append({"wav": name, "offset": offset, "duration": duration})
            references.append(reference)
        line = {"source": name, "prediction": " ".join(document.words),
                "delays": [MILLI * d for d in document.delays]}
        if document.elapsed is not None:
            line["elapsed"] = [MILLI * e for e in document.elapsed]
        hypotheses.append(line)
    return segmentation, references, hypotheses
