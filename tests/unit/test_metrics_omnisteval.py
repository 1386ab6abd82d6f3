"""simulref's YAAL and degeneracy diagnostics against OmniSTEval's own scorers.

Each corpus of random traces is scored twice: by ``simulref.evaluate.summarize`` (what
``simulref eval`` stores and tabulates) and by OmniSTEval 0.1.10 on the SimulEval-format
JSON Lines file of the same traces (``simulref.omnisteval_format.shortform_instance``),
read with the loader ``omnisteval shortform`` uses
(``load_shortform_instances``) and scored by ``evaluate_instances(is_longform=False)``,
its short-form path. Needs ``omnisteval`` (skipped without it).
"""

from __future__ import annotations

import json
import logging
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

omnisteval_io = pytest.importorskip("omnisteval.io")
omnisteval_scoring = pytest.importorskip("omnisteval.scoring")

from simulref import metrics  # noqa: E402
from simulref.evaluate import Pair, RunSpec, summarize  # noqa: E402
from simulref.omnisteval_format import shortform_instance  # noqa: E402
from simulref.trace import Finish, Read, Settings, Trace, Write  # noqa: E402

logging.getLogger("omnisteval").setLevel(logging.ERROR)

SETTINGS = Settings(model="m", k=2, layout="group", system="s")
WORD = 0.4  # seconds per source word (summarize's default)


def close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@st.composite
def sentences(draw):
    """(trace, reference): random delays and non-decreasing event times from 0."""
    x = draw(st.integers(1, 10))
    n = draw(st.integers(0, 12))
    delays = sorted(draw(st.lists(st.integers(0, x), min_size=n, max_size=n)))
    y = draw(st.integers(1, 12))
    source = [f"s{j}" for j in range(x)]
    steps = iter(draw(st.lists(st.floats(0, 2), min_size=x + n + 1, max_size=x + n + 1)))
    clock = 0.0

    def tick():
        nonlocal clock
        clock += next(steps)
        return clock

    events: list = []
    read = 0
    for i, d in enumerate(delays):
        while read < d:
            events.append(Read(read, source[read], (read,), tick()))
            read += 1
        events.append(Write(i, f" t{i}", (100 + i,), tick()))
    while read < x:
        events.append(Read(read, source[read], (read,), tick()))
        read += 1
    events.append(Finish("eos", tick()))
    return Trace(SETTINGS, tuple(source), tuple(events)), " ".join(f"r{j}" for j in range(y))


def omnisteval_shortform(tmp_path, corpus) -> dict:
    path = tmp_path / "instances.log"
    lines = [shortform_instance(t, r, word_duration=WORD) for t, r in corpus]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    instances = omnisteval_io.load_shortform_instances(
        str(path), None, emission_cu_key="delays", emission_ca_key="elapsed")
    scores, _, _ = omnisteval_scoring.evaluate_instances(
        instances, compute_quality=False, is_longform=False)
    return scores


def summary(corpus) -> dict:
    pairs = [Pair("x", reference, i + 1) for i, (_, reference) in enumerate(corpus)]
    records = [{"index": i, "trace": t.to_jsonl(), "seconds": 1.0, "generated_tokens": 1}
               for i, (t, _) in enumerate(corpus)]
    return summarize(RunSpec("group", 2), pairs, records, word_duration=WORD)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(sentences(), min_size=1, max_size=6))
def test_eval_summary_matches_omnisteval_shortform(tmp_path, corpus):
    if not any(metrics.hypothesis_delays(t) for t, _ in corpus):
        return  # OmniSTEval refuses a corpus without a single target word
    theirs = omnisteval_shortform(tmp_path, corpus)
    ours = summary(corpus)
    latency = ours["latency_reference_length"]
    assert close(latency.get("YAAL", math.nan), theirs["yaal"])
    # Our CA clock is in seconds, the file's in source words: one factor WORD apart.
    assert close(latency.get("YAAL_CA", math.nan), WORD * theirs["ca_yaal"])
    for name in ("AL", "LAAL", "AP", "DAL"):  # OmniSTEval's copies of SimulEval's scorers
        assert close(latency[name], theirs[name.lower()]), name
    assert close(latency["AP_CA"], theirs["ca_ap"])
    degeneracy = ours["degeneracy"]
    assert close(degeneracy["SWF"], theirs["swf"])
    assert close(degeneracy["EFSW"], theirs["efsw"])
    assert close(degeneracy["DSPTV"], theirs["dsptv"])
    assert degeneracy["degenerate"] == (theirs["degenerate_policy"] == 1.0)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 15), st.lists(st.floats(0, 20), min_size=1, max_size=20),
       st.integers(1, 20))
def test_yaal_matches_omnisteval_on_times(x, delays, y):
    delays = sorted(delays)
    instance = omnisteval_scoring.Instance(
        prediction=" ".join("t" for _ in delays), reference=" ".join("r" for _ in range(y)),
        source_length=float(x), emission_cu=delays)
    expected = omnisteval_scoring.YAALScorer().compute(instance)
    got = metrics.yaal(delays, x, y)
    assert (got is None) == (expected is None)
    if got is not None:
        assert close(got, expected)


def test_a_degenerate_policy_is_flagged_by_both():
    late = [0] + [5] * 9
    instance = omnisteval_scoring.Instance(
        prediction=" ".join("t" for _ in late), reference=" ".join("r" for _ in range(10)),
        source_length=5, emission_cu=late)
    theirs = omnisteval_scoring.ShortformDegeneracyScorer()([instance])
    ours = metrics.degeneracy([(late, 5, 10)])
    assert theirs["degenerate_policy"] == 1.0 and ours["degenerate"] is True
    assert close(ours["DSPTV"], theirs["dsptv"])
