"""SimulRefAgent under SimulEval 1.1.4's own evaluator, against simulref's own numbers.

SimulEval is the independent twin here: its instances feed the agent one word per call
and record the delays themselves, its scorers compute AL/LAAL/AP/DAL/ATD. The agent's
traces must equal ``translate()`` on the same sentences, and SimulEval's delays and
scores must equal simulref's metrics on those traces (1e-9).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from argparse import Namespace
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from simuleval.evaluator.scorers import get_scorer_class
from tiny_gguf import write_tiny_gguf
from traces import untimed

from simulref import evaluate, metrics
from simulref.decoder import translate
from simulref.integrations.simuleval_agent import (
    SimulRefAgent,
    model_dtype,
    run_simuleval,
    source_words,
)
from simulref.policy import Scripted
from simulref.testing import tiny_model, tiny_tokenizer
from simulref.trace import Look

ROOT = Path(__file__).resolve().parents[2]
SCORED = ("AL", "LAAL", "AP", "DAL")  # per instance in ins.metrics; ATD only as a corpus mean


@cache
def model_of(arch: str):
    return tiny_model(arch, 0)


def tok():
    return tiny_tokenizer()


def pairs(n: int = 10):
    return evaluate.read_pairs(evaluate.dataset_path("postgres-en-fr"))[:n]


def write_files(tmp_path: Path, sources, references):
    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    src.write_text("".join(s + "\n" for s in sources), encoding="utf-8")
    ref.write_text("".join(r + "\n" for r in references), encoding="utf-8")
    return src, ref


def simuleval_words(trace) -> list[str]:
    """The words SimulEval keeps of a trace: each write's text split on whitespace."""
    return [word for w in trace.writes for word in w.text.split()]


def simuleval_reference_length(reference: str) -> int:
    return len(reference.split(" "))  # TextOutputInstance.reference_length


def mean(values):
    return math.fsum(values) / len(values)


def check_against_simulref(evaluator, traces, references):
    """SimulEval's predictions, delays and scores against simulref's on the same traces."""
    instances = list(evaluator.instances.values())
    assert len(instances) == len(traces) == len(references)
    ours_ref, ours_hyp = {}, {}
    for ins, trace, reference in zip(instances, traces, references, strict=True):
        # Same translation: SimulEval joins the words of the writes with single spaces,
        # so it differs from target_text at most in whitespace between writes.
        assert ins.prediction == " ".join(simuleval_words(trace))
        assert "".join(ins.prediction.split()) == "".join(trace.target_text.split())
        assert ins.delays == [d for d, _ in metrics.hypothesis_delays(trace)]
        assert ins.source_length == len(trace.source_words)
        if not ins.delays:
            continue  # SimulEval skips a sentence without output, and so do we
        scores = metrics.latency_scores(trace, simuleval_reference_length(reference))
        for name in SCORED:
            assert ins.metrics[name] == pytest.approx(scores[name], abs=1e-9), name
        for name, value in scores.items():
            ours_ref.setdefault(name, []).append(value)
        for name, value in metrics.latency_scores(trace).items():
            ours_hyp.setdefault(name, []).append(value)
    # Corpus scores: SimulEval's defaults (|Y| = reference length; DAL uses n anyway) ...
    for name in metrics.METRICS:
        assert evaluator.latency[name] == pytest.approx(mean(ours_ref[name]), abs=1e-9), name
    # ... and its --no-use-ref-len scorers (|Y| = hypothesis length), on the same instances.
    for name in metrics.METRICS:
        scorer = get_scorer_class("latency", name)(use_ref_len=False)
        assert scorer(evaluator.instances) == pytest.approx(mean(ours_hyp[name]), abs=1e-9)
    return ours_ref


@pytest.mark.parametrize("arch, k, layout", [("llama", 3, "group"), ("qwen2", 1, "interleaved"),
                                             ("llama", 2, "reencode")])
def test_simuleval_scores_equal_simulref_scores(tmp_path, arch, k, layout):
    model = model_of(arch)
    data = pairs(10)
    src, ref = write_files(tmp_path, [p.source for p in data], [p.reference for p in data])
    agent = SimulRefAgent(model, tok(), k=k, layout=layout, model_id="tiny")
    evaluator = run_simuleval(agent, src, ref)
    # The agent's traces are translate()'s: one word per call, no look-ahead, one cache.
    for pair, trace in zip(data, agent.traces, strict=True):
        expected = translate(model, tok(), pair.source, k=k, layout=layout, model_id="tiny")
        assert untimed(trace) == untimed(expected)
    ours = check_against_simulref(evaluator, agent.traces, [p.reference for p in data])
    # simulref's eval pipeline on the same traces gives the same corpus latency (it counts
    # reference words with split(), SimulEval with split(" "): the same on this data).
    assert all(len(p.reference.split()) == simuleval_reference_length(p.reference)
               for p in data)
    records = [{"index": i, "trace": t.to_jsonl(), "generated_tokens": 0, "seconds": 0.0}
               for i, t in enumerate(agent.traces)]
    summary = evaluate.summarize(evaluate.RunSpec(layout, k), data, records)
    for name in metrics.METRICS:
        assert summary["latency_reference_length"][name] == pytest.approx(
            evaluator.latency[name], abs=1e-9)
        assert summary["latency_reference_length"][name] == pytest.approx(mean(ours[name]))


@pytest.mark.parametrize("delays", [(1, 1, 1), (1, 1, 3, 3, 3), (2, 2, 2, 2, 5, 5)])
def test_several_writes_between_two_reads_keep_their_delay(tmp_path, delays):
    """A policy that writes several words after one read: they must all reach SimulEval
    in the call that sent that word (one WriteAction), not in later calls that have
    already sent more words."""
    model = model_of("llama")
    data = pairs(4)
    src, ref = write_files(tmp_path, [p.source for p in data], [p.reference for p in data])
    policy = Scripted(delays)
    agent = SimulRefAgent(model, tok(), policy=policy, model_id="tiny")
    evaluator = run_simuleval(agent, src, ref)
    repeated = 0  # writes with the same delay as the one before, the source not done
    for pair, trace in zip(data, agent.traces, strict=True):
        expected = translate(model, tok(), pair.source, policy=policy, model_id="tiny")
        assert untimed(trace) == untimed(expected)
        n = len(pair.source.split())
        repeated += sum(a == b < n for a, b in zip(trace.delays, trace.delays[1:], strict=False))
    assert repeated  # the case under test happened
    check_against_simulref(evaluator, agent.traces, [p.reference for p in data])


def test_an_empty_source_line_and_the_next_sentence(tmp_path):
    model = model_of("qwen2")
    src, ref = write_files(tmp_path, ["", "canceling statement due to user request"],
                           ["rien", "annulation de la requête"])
    agent = SimulRefAgent(model, tok(), k=2, model_id="tiny")
    evaluator = run_simuleval(agent, src, ref, args=["--quality-metrics", "BLEU"])
    empty, sentence = agent.traces
    assert empty.finish_reason == "empty_source" and empty.events[-1].reason == "empty_source"
    assert evaluator.instances[0].prediction == "" and evaluator.instances[0].delays == []
    expected = translate(model, tok(), "canceling statement due to user request", k=2,
                         model_id="tiny")
    assert untimed(sentence) == untimed(expected)  # reset() started afresh


def test_the_command_line(tmp_path):
    """SimulEval's own argument parsing and from_args, in a subprocess, on a GGUF file.
    (``python -m simulref.integrations.simuleval_agent`` is ``simuleval --agent-class
    ...SimulRefAgent`` without simuleval.cli, which needs tornado.)"""
    data = pairs(3)
    src, ref = write_files(tmp_path, [p.source for p in data], [p.reference for p in data])
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    out = tmp_path / "out"
    system = "Translate the following English paragraph to German"
    command = [sys.executable, "-m", "simulref.integrations.simuleval_agent",
               "--source", str(src), "--target", str(ref), "--output", str(out),
               "--k", "2", "--model", str(gguf), "--model-dtype", "float32",
               "--system-prompt", system, "--layout", "interleaved", "--no-progress-bar"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    from simulref import models

    model, tokenizer = models.load(gguf, "float32")
    logged = [json.loads(line) for line in (out / "instances.log").read_text().splitlines()]
    traces = [translate(model, tokenizer, p.source, k=2, system=system, layout="interleaved")
              for p in data]
    for record, trace in zip(logged, traces, strict=True):
        assert record["prediction"] == " ".join(simuleval_words(trace))
        assert record["delays"] == list(trace.delays)
    header, values = (out / "scores.tsv").read_text().splitlines()
    printed = dict(zip(header.split("\t"), map(float, values.split("\t")), strict=True))
    scores = [metrics.latency_scores(t, simuleval_reference_length(p.reference))
              for t, p in zip(traces, data, strict=True)]
    for name in SCORED:
        assert printed[name] == pytest.approx(mean([s[name] for s in scores]), abs=5e-4)
    # With --output SimulEval scores the instances it re-reads from instances.log, and for
    # those (LogInstance, not TextInputInstance) its ATD takes the speech branch: delays
    # read as milliseconds, 300 ms source tokens, target words of length 0. Every target
    # word then ends exactly when its paired source token does: ATD is 0 whatever the
    # schedule (docs/simuleval.md). simulref's text ATD is not.
    assert printed["ATD"] == 0.0
    assert mean([metrics.atd(list(t.delays)) for t in traces]) > 1


def test_agent_options_reach_the_decoder():
    agent = SimulRefAgent(model_of("llama"), tok(), k=4, layout="interleaved",
                          system="Translate to German", max_tokens_per_word=7)
    assert agent.config.k == 4 and agent.config.max_tokens_per_word == 7
    assert agent.model_id == "llama"
    with pytest.raises(ValueError, match="layout"):
        SimulRefAgent(model_of("llama"), tok(), layout="diagonal")
    with pytest.raises(ValueError, match="k: expected an int >= 1"):
        SimulRefAgent(model_of("llama"), tok(), k=0)
    with pytest.raises(TypeError, match="model_id"):
        SimulRefAgent(model_of("llama"), tok(), model_id=3)


@given(st.lists(st.text(alphabet=" \tab\n", max_size=6), max_size=6))
def test_source_words_are_the_words_of_the_segments(segments):
    assert source_words(segments) == " ".join(segments).split()


def test_source_words_refuse_non_text():
    with pytest.raises(TypeError, match=r"states.source\[1\]: expected text"):
        source_words(["a", [0.1, 0.2]])


@pytest.mark.parametrize("given_args, expected", [
    (dict(model_dtype="quantized", dtype="fp16", fp16=False), "quantized"),
    (dict(model_dtype=None, dtype="fp16", fp16=False), "float16"),
    (dict(model_dtype=None, dtype="fp32", fp16=False), "float32"),
    (dict(model_dtype=None, dtype=None, fp16=True), "float16"),
    (dict(model_dtype=None, dtype=None, fp16=False), None),
])
def test_model_dtype(given_args, expected):
    assert model_dtype(Namespace(**given_args)) == expected


@pytest.mark.slow
def test_simuleval_scores_equal_simulref_scores_on_smollm2(tmp_path):
    """The real small preset (3 sentences, about 80 s on 2 busy CPU cores; the
    10-sentence comparison with `simulref eval` is in docs/simuleval.md)."""
    from simulref import models

    model, tokenizer = models.load("smollm2-135m")
    data = pairs(3)
    src, ref = write_files(tmp_path, [p.source for p in data], [p.reference for p in data])
    agent = SimulRefAgent(model, tokenizer, k=3, model_id="smollm2-135m")
    evaluator = run_simuleval(agent, src, ref)
    check_against_simulref(evaluator, agent.traces, [p.reference for p in data])
    assert all(t.writes for t in agent.traces)


@pytest.mark.parametrize("text", ["confidence:0.5", "local-agreement:2"])
def test_observing_policies_run_in_the_agent(tmp_path, text):
    """Confidence and LocalAgreement through SimulEval: translate()'s traces (the Feed
    gets one word per call, the last with the suffix), SimulEval's delays and scores."""
    from simulref.policy import parse_policy

    model = model_of("llama")
    data = pairs(3)
    src, ref = write_files(tmp_path, [p.source for p in data], [p.reference for p in data])
    policy = parse_policy(text)
    agent = SimulRefAgent(model, tok(), policy=policy, model_id="tiny",
                          max_tokens_per_word=6)
    evaluator = run_simuleval(agent, src, ref)
    for pair, trace in zip(data, agent.traces, strict=True):
        expected = translate(model, tok(), pair.source, policy=policy, model_id="tiny",
                             max_tokens_per_word=6)
        assert without_probs(trace) == without_probs(expected)
        # The agent's live engine and translate()'s prefilled one round differently.
        assert [e.probs[0] for e in trace.events if isinstance(e, Look)] == pytest.approx(
            [e.probs[0] for e in expected.events if isinstance(e, Look)], abs=1e-4)
    check_against_simulref(evaluator, agent.traces, [p.reference for p in data])


def without_probs(trace):
    return [("look", e.read, e.token_ids) if isinstance(e, Look) else e
            for e in untimed(trace).events]


def test_the_policy_option():
    import argparse

    parser = argparse.ArgumentParser()
    SimulRefAgent.add_args(parser)
    from simulref.policy import Confidence

    assert parser.parse_args(["--policy", "confidence:0.7"]).policy == Confidence(0.7)
    assert parser.parse_args([]).policy is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--policy", "sometimes"])
