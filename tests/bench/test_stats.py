"""The pure pieces of the benchmarks: statistics, pairing, latencies, the report (fast,
no model; ``pytest tests/bench/test_stats.py`` runs them alone)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from bench_report import markdown
from benchlib import (
    Block,
    loglog_slope,
    paired_ratios,
    percentile,
    pooled_rate,
    read_latencies,
    scaling_summary,
    summary,
)
from hypothesis import given
from hypothesis import strategies as st

values = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40)
times = st.lists(st.floats(0, 1e3, allow_nan=False), max_size=30)


@given(values, st.floats(0, 100))
def test_percentile_matches_numpy(xs, q):
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-9,
                                              abs=1e-6)


@given(values)
def test_percentile_ends_and_order(xs):
    assert percentile(xs, 0) == min(xs)
    assert percentile(xs, 100) == max(xs)
    assert percentile(xs, 5) <= percentile(xs, 50) <= percentile(xs, 95)


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError, match="values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="q"):
        percentile([1.0], 101)


@given(st.floats(0.01, 100), st.floats(-3, 3),
       st.lists(st.floats(0.5, 1000), min_size=2, max_size=8, unique=True))
def test_loglog_slope_recovers_the_exponent(c, p, xs):
    if max(xs) / min(xs) < 1.01:
        return  # too close together for a stable fit
    assert loglog_slope(xs, [c * x**p for x in xs]) == pytest.approx(p, abs=1e-6)


def test_loglog_slope_rejects_bad_input():
    for xs, ys in (([1.0], [1.0]), ([1.0, 2.0], [1.0]), ([0.0, 2.0], [1.0, 2.0]),
                   ([2.0, 2.0], [1.0, 3.0])):
        with pytest.raises(ValueError):
            loglog_slope(xs, ys)


def test_summary():
    assert summary([]) == {"n": 0, "median": None, "p5": None, "p95": None, "mean": None}
    s = summary([3.0, 1.0, 2.0])
    assert (s["n"], s["median"], s["mean"]) == (3, 2.0, 2.0)


seconds = st.one_of(st.just(0.0), st.floats(1e-6, 5))
blocks = st.lists(st.builds(Block, st.integers(0, 20), seconds), max_size=10)


@given(blocks, blocks)
def test_paired_ratios_pair_rounds_with_work_on_both_sides(ours, theirs):
    ratios = paired_ratios(ours, theirs)
    expected = [a.tokens / a.seconds / (b.tokens / b.seconds)
                for a, b in zip(ours, theirs, strict=False)
                if a.tokens and b.tokens and a.seconds > 0 and b.seconds > 0]
    assert ratios == pytest.approx(expected)


@given(blocks)
def test_a_run_against_itself_is_one(bs):
    assert all(r == pytest.approx(1.0) for r in paired_ratios(bs, bs))


def test_pooled_rate():
    assert pooled_rate([Block(4, 1.0), Block(6, 4.0)]) == 2.0
    assert pooled_rate([Block(0, 1.0)]) is None


@given(times, times)
def test_read_latencies_against_a_plain_search(reads, firsts):
    slow = []
    for t in sorted(firsts):
        before = [r for r in reads if r <= t]
        if before:
            slow.append(t - max(before))
    assert read_latencies(reads, firsts) == pytest.approx(slow)
    assert all(x >= 0 for x in read_latencies(reads, firsts))


def _runs(layout, seconds, fed):
    return [{"words": n, "layout": layout, "seconds": seconds(n), "tokens_fed": fed(n),
             "forwards": n, "target_words": n, "finish": "max_new_words"}
            for n in (10, 20, 40, 80)]


def test_scaling_summary_of_linear_and_quadratic_runs():
    rows = _runs("group", lambda n: 0.5 * n, lambda n: 3 * n) + _runs(
        "reencode", lambda n: 0.01 * n * n, lambda n: n * n)
    s = scaling_summary(rows)
    assert s["group"]["time_exponent"] == pytest.approx(1)
    assert s["reencode"]["time_exponent"] == pytest.approx(2)
    assert s["reencode"]["time_exponent_last"] == pytest.approx(2)
    assert s["reencode"]["tokens_fed_exponent"] == pytest.approx(2)
    assert s["longest"] == 80
    assert s["reencode_over_group_time"] == pytest.approx(0.01 * 80 * 80 / 40)
    assert s["reencode_over_group_tokens_fed"] == pytest.approx(80 * 80 / 240)


def test_scaling_summary_local_exponent_is_between_the_two_longest():
    def time(n):
        return 5 + 0.01 * n * n  # a fixed cost, then quadratic: the exponent grows with N

    s = scaling_summary(_runs("reencode", time, lambda n: n * n))
    assert s["reencode"]["time_exponent_last"] == pytest.approx(
        math.log(time(80) / time(40)) / math.log(2))
    assert s["reencode"]["time_exponent"] < s["reencode"]["time_exponent_last"] < 2


def _document():
    ratio = summary([0.9, 1.0, 1.1])
    decode = {
        "sentences": 3, "same_tokens": 3, "decode_ratio": ratio, "decode_ratio_pooled": 0.97,
        "decode_tps": 17.0, "decode_tps_mlx_lm": 17.5, "engines_agree": 3,
        "engines": {"prefilled": {
            "waitk_ratio": summary([0.5]), "waitk_ratio_pooled": 0.5, "waitk_tps": 9.0,
            "extra_target_forwards_per_word": 0.7, "forwards_per_token": 1.04,
            "source_forwards_per_word": 0.9, "latency_steps": summary([])}},
        "whole_run": {"prefilled": {"ratio_pooled": 0.91, "ratio": summary([0.9, 0.92]),
                                    "tokens": 40}},
        "live": {"agree": 3, "sentences": 3, "fused": {
            "latency_steps": summary([1.5, 2.0]), "latency_s": summary([0.1, 0.12]),
            "forwards_per_token": 1.1, "engine_ran": ["fused"]}},
        "first_read_prefill_ratio": ratio,
        "full_prompt_prefill_ratio": ratio, "first_read_tps": summary([100.0]),
        "first_read_tps_mlx_lm": summary([120.0]),
    }
    rows = _runs("group", lambda n: 0.5 * n, lambda n: 3 * n) + _runs(
        "reencode", lambda n: 0.01 * n * n, lambda n: n * n)
    scaling = {**scaling_summary(rows), "settings": {"k": 3}}
    blas = {"applicable": True, "library": "/x/libblas.so.3", "prompt_tokens": 50,
            "variants": {"reference": {"runs": [{}], "load_s": 9.0, "prefill_tps": 9.0,
                                       "decode_tps": 8.0},
                         "openblas-1": {"runs": [{}, {}], "load_s": 4.0, "prefill_tps": 250.0,
                                        "decode_tps": 16.0}},
            "speedup": {"openblas-1": {"prefill": 250 / 9, "decode": 2.0}}}
    machine = {"platform": "Linux-x", "cpus": 2, "python": "3.11", "mlx": "0.32.4",
               "mlx_lm": "0.32.2", "device": "Device(cpu, 0)",
               "openblas": {"active": True, "preloaded": "/x/libblas.so.3", "threads": "1"},
               "load_average_start": [2.5, 2, 2], "load_average_end": [3.0, 2, 2]}
    return {"command": "pytest tests/bench", "runtime_s": 600.0, "created": "now",
            "machine": machine, "results": [
                {"section": "decode", "model": "m", "weights": "float32", "metrics": decode},
                {"section": "scaling", "model": "m", "metrics": scaling},
                {"section": "blas", "model": "m", "metrics": blas}]}


def test_markdown_shows_every_section_and_figure():
    text = markdown(_document())
    for needle in ("## Decoding", "0.97", "1.00 (0.91-1.09, n=3)", "17.0 / 17.5",
                   "| m | prefilled | 3/3 | 0.50 (0.50-0.50, n=1) | 0.50 | 9.0 | 1.04 |",
                   "## Whole translation", "| m | prefilled | 0.91 |",
                   "## Live source", "1.75 (1.52-1.98, n=2)", "## Prefill",
                   "100.0 / 120.0", "## Scaling", "N^1.00", "N^2.00", "| 80 | 40.0 | 64.0 |",
                   "## BLAS", "| openblas-1 | 2 | 4.0 | 250.0 | 16.00 | 27.78 | 2.00 |",
                   "OPENBLAS_NUM_THREADS=1", "2.50 -> 3.00"):
        assert needle in text, needle
    for line in text.splitlines():
        if line.startswith("|"):
            assert line.endswith("|")


def test_markdown_of_a_blas_result_that_does_not_apply():
    doc = _document()
    doc["results"] = [{"section": "blas", "metrics": {"applicable": False,
                                                      "reason": "darwin: Linux only"}}]
    assert "Not applicable here: darwin: Linux only" in markdown(doc)
