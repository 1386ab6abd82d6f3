"""simulref.metrics against SimulEval 1.1.4's own latency scorers, on random schedules.

Needs ``simuleval`` importable (the ``simuleval`` extra). Text-to-text instances cover the
word metrics; SimulEval's log instances (speech input, 300 ms units, text output) cover
the computation-aware path, which SimulEval refuses for text input.
"""

from __future__ import annotations

import json
import logging
import math
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pydub, imported by simuleval, warns about ffmpeg
    from simuleval.evaluator.instance import LogInstance, TextToTextInstance
    from simuleval.evaluator.scorers.latency_scorer import (
        ALScorer,
        APScorer,
        ATDScorer,
        DALScorer,
        LAALScorer,
    )

from simulref.metrics import al, ap, atd, dal, laal, latency_scores
from simulref.trace import Finish, Read, Settings, Trace, Write

logging.getLogger("simuleval").setLevel(logging.ERROR)

SCORERS = {"AP": APScorer, "AL": ALScorer, "LAAL": LAALScorer, "DAL": DALScorer,
           "ATD": ATDScorer}


def text_instance(delays, source_length, reference_length):
    ins = TextToTextInstance(0, None, None)
    ins.source = [f"s{j}" for j in range(source_length)]
    ins.reference = " ".join(f"r{j}" for j in range(reference_length))
    ins.latency_unit = "word"
    ins.delays = list(delays)
    ins.elapsed = [0] * len(delays)  # what SimulEval records for text input
    return ins


def simuleval_scores(delays, source_length, reference_length, use_ref_len):
    return {name: cls(use_ref_len=use_ref_len)({0: text_instance(delays, source_length,
                                                                 reference_length)})
            for name, cls in SCORERS.items()}


def ours(delays, x, y):
    return {"AP": ap(delays, x, y), "AL": al(delays, x, y), "LAAL": laal(delays, x, y),
            "DAL": dal(delays, x), "ATD": atd(delays)}


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@st.composite
def schedules(draw):
    x = draw(st.integers(1, 15))
    n = draw(st.integers(1, 20))
    d = sorted(draw(st.lists(st.integers(0, x), min_size=n, max_size=n)))
    return d, x, draw(st.integers(1, 20))


@settings(max_examples=300, deadline=None)
@given(schedules(), st.booleans())
def test_word_metrics_match_simuleval(case, use_ref_len):
    d, x, y_ref = case
    y = y_ref if use_ref_len else len(d)
    expected = simuleval_scores(d, x, y_ref, use_ref_len)
    got = ours(d, x, y)
    for name in SCORERS:
        assert close(got[name], expected[name]), (name, got[name], expected[name])


@settings(max_examples=300, deadline=None)
@given(schedules(), st.booleans(), st.data())
def test_computation_aware_metrics_match_simuleval(case, use_ref_len, data):
    d, x, y_ref = case
    unit = 300.0  # SimulEval's source token length for speech input, in ms
    compute = sorted(data.draw(st.lists(st.floats(0, 5000), min_size=len(d),
                                        max_size=len(d))))
    delays_ms = [unit * di for di in d]
    elapsed = [a + c for a, c in zip(delays_ms, compute, strict=True)]
    log = json.dumps({"index": 0, "delays": delays_ms, "elapsed": elapsed,
                      "source_length": unit * x, "prediction": "",
                      "reference": " ".join(f"r{j}" for j in range(y_ref))})
    y = y_ref if use_ref_len else len(d)
    got = {"AP": ap(elapsed, unit * x, y), "AL": al(elapsed, unit * x, y),
           "LAAL": laal(elapsed, unit * x, y), "DAL": dal(elapsed, unit * x),
           # text output from speech: SimulEval gives target tokens no duration
           "ATD": atd(d, compute, word_duration=unit, target_token_duration=0.0)}
    for name, cls in SCORERS.items():
        expected = cls(computation_aware=True, use_ref_len=use_ref_len)({0: LogInstance(log)})
        assert close(got[name], expected), (name, got[name], expected)


@settings(max_examples=100, deadline=None)
@given(schedules())
def test_latency_scores_of_a_trace_match_simuleval(case):
    d, x, y_ref = case
    source = [f"s{j}" for j in range(x)]
    events: list = []
    for i, di in enumerate(d):
        events += [Read(j, source[j], (j,)) for j in range(sum(isinstance(e, Read)
                                                               for e in events), di)]
        events.append(Write(i, f" t{i}", (i,)))
    events.append(Finish("eos"))
    trace = Trace(Settings(model="m", k=None, layout="group", system=""), source, events)
    assert list(trace.delays) == d
    with_ref = simuleval_scores(d, x, y_ref, True)
    without = simuleval_scores(d, x, y_ref, False)
    got_ref, got_own = latency_scores(trace, y_ref), latency_scores(trace)
    for name in SCORERS:
        assert close(got_ref[name], with_ref[name])
        assert close(got_own[name], without[name])


def test_documented_differences_on_bad_input():
    # |X| = 0: SimulEval divides by zero; simulref says what is wrong.
    with pytest.raises(ZeroDivisionError):
        ALScorer()({0: text_instance([0], 0, 1)})
    with pytest.raises(ValueError, match="source_length must be > 0"):
        al([0], 0, 1)
    # No target words: SimulEval skips the sentence (and fails on a corpus of only that).
    with pytest.raises(Exception):  # noqa: B017 - statistics.StatisticsError, from mean([])
        ALScorer()({0: text_instance([], 3, 1)})
    with pytest.raises(ValueError, match="delays is empty"):
        al([], 3, 1)
    # SimulEval counts reference words with split(" "): an empty reference is one word.
    assert text_instance([1], 1, 0).reference_length == 1
