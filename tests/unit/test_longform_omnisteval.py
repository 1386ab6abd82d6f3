"""Long-form scoring against OmniSTEval 0.1.10's ``longform`` path, run on our documents.

Each random corpus of documents is written (``simulref.omnisteval_format.longform_inputs``)
as the files ``omnisteval longform
--speech_segmentation seg.json --ref_sentences_file ref.txt --hypothesis_file hyp.jsonl
--word_level`` reads (the segmentation in source words instead of seconds: offset = the
sentence's first source word, duration = its word count), loaded with OmniSTEval's own
loader, resegmented by its ``resegment`` and scored by ``evaluate_instances(
is_longform=True)``. The resegmentation must be identical (each sentence's words and
delays) and BLEU, chrF and every Long* latency equal to 1e-9. Needs ``omnisteval``.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

alignment = pytest.importorskip("omnisteval.alignment")
omnisteval_io = pytest.importorskip("omnisteval.io")
omnisteval_resegment = pytest.importorskip("omnisteval.resegment")
omnisteval_scoring = pytest.importorskip("omnisteval.scoring")

from simulref.longform_metrics import LONG_METRICS, Document, longform_scores, segments  # noqa: E402
from simulref.omnisteval_format import MILLI as MS  # noqa: E402
from simulref.omnisteval_format import longform_inputs  # noqa: E402

logging.getLogger("omnisteval").setLevel(logging.ERROR)


class SerialPool:
    """OmniSTEval aligns documents in a multiprocessing Pool; a fork per example is too
    much for a test on shared CPUs, and map's result is the same run in-process."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, function, items):
        return [function(item) for item in items]


@pytest.fixture(autouse=True)
def serial_alignment(monkeypatch):
    monkeypatch.setattr(alignment, "Pool", SerialPool)


def close(a, b) -> bool:
    if math.isnan(a) and math.isnan(b):
        return True
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


# Overlapping spellings, accents, an NFKC ligature, punctuation tokens and mixed case: the
# similarity, normalisation and tie rules all get exercised.
VOCABULARY = ["le", "Le", "la", "chat", "chats", "dort", "il", "fait", "beau", "été", "Été",
              "ﬁn", "fin", ".", ",", "-", "?", "oui", "a", "ab", "ba"]
reference_sentences = st.lists(st.sampled_from(VOCABULARY), min_size=1, max_size=6).map(" ".join)


@st.composite
def documents(draw):
    refs = draw(st.lists(reference_sentences, min_size=1, max_size=4))
    sources = tuple(" ".join("s" for _ in range(draw(st.integers(1, 6)))) for _ in refs)
    total = sum(len(s.split()) for s in sources)
    if draw(st.booleans()):  # an output close to the references, or random words
        words = [w for r in refs for w in r.split() if draw(st.integers(0, 4))]
        words += draw(st.lists(st.sampled_from(VOCABULARY), max_size=3))
    else:
        words = draw(st.lists(st.sampled_from(VOCABULARY), max_size=20))
    n = len(words)
    delays = sorted(draw(st.lists(st.integers(0, total), min_size=n, max_size=n)))
    compute = 0.0
    elapsed = []
    for d in delays:
        compute += draw(st.sampled_from([0.0, 0.25, 0.5, 1.5]))
        elapsed.append(d + compute)
    return Document(sources, tuple(refs), tuple(words), tuple(delays), tuple(elapsed))


def omnisteval_longform(tmp_path, docs):
    """OmniSTEval's resegmented instances and scores of our documents (its CLI's path)."""
    segmentation, refs, hyps = longform_inputs(docs)
    (tmp_path / "seg.json").write_text(json.dumps(segmentation))
    (tmp_path / "ref.txt").write_text("".join(r + "\n" for r in refs))
    (tmp_path / "hyp.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hyps))
    ref_words, hyp_words, seg, ref_sentences = omnisteval_io.load_resegmentation_inputs(
        str(tmp_path / "seg.json"), None, str(tmp_path / "ref.txt"),
        str(tmp_path / "hyp.jsonl"), hypothesis_format="jsonl")
    instances, _ = omnisteval_resegment.resegment(ref_words, hyp_words, seg, ref_sentences)
    scores, _, _ = omnisteval_scoring.evaluate_instances(instances, is_longform=True)
    return instances, scores


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(documents(), min_size=1, max_size=3))
def test_longform_scores_match_omnisteval(tmp_path, docs):
    instances, theirs = omnisteval_longform(tmp_path, docs)
    ours = [seg for doc in docs for seg in segments(doc)]
    assert len(ours) == len(instances)
    for seg, instance in zip(ours, instances, strict=True):
        assert seg.prediction == instance.prediction  # the same words, in the same order
        assert seg.reference == instance.reference
        assert seg.source_length * MS == instance.source_length
        if seg.delays:  # delays are whole words here: exact in ms too
            assert [MS * d for d in seg.delays] == instance.emission_cu
            assert all(close(MS * a, b) for a, b in zip(seg.elapsed, instance.emission_ca,
                                                        strict=True))
            assert seg.to_end * MS == instance.time_to_recording_end
        else:
            assert instance.emission_cu is None
    got = longform_scores(docs)
    assert close(got["BLEU"], theirs["bleu"]) and close(got["chrF"], theirs["chrf"])
    if not any(seg.delays for seg in ours):
        return  # OmniSTEval computes no latency for an output without words
    for name in LONG_METRICS:
        key = "long_" + name.removeprefix("Long").lower()
        scale = 1 if name == "LongAP" else MS  # AP is a ratio: no unit
        assert close(scale * got[name], theirs[key]), name
        assert close(scale * got[f"{name}_CA"], theirs["ca_" + key]), name + "_CA"
