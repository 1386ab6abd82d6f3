"""--policy on translate, watch and eval: the policy syntax, the eval grid, and runs of the
tiny GGUF model (the same traces as the library's)."""

from __future__ import annotations

import argparse
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulref import decoder, evaluate, models
from simulref.cli import main
from simulref.cli.args import parse_policy_grid
from simulref.cli.eval import _policies
from simulref.policy import Confidence, LocalAgreement, ReadAll, WaitK
from simulref.trace import read_traces

SENTENCE = "The weather is nice today"
TSV = "The weather is nice\tIl fait beau\nI want to buy a car\tJe veux acheter une voiture\n"
FAST = ["--max-tokens-per-word", "4"]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> str:
    from tiny_gguf import write_tiny_gguf

    return str(write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", seed=1))


@pytest.fixture(autouse=True)
def _narrow_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")


# --- the syntax ----------------------------------------------------------------------


@given(st.lists(st.integers(1, 30), min_size=1, max_size=5))
def test_a_grid_of_lags_is_one_wait_k_each(ks):
    assert parse_policy_grid("wait-k:" + ",".join(map(str, ks))) == [WaitK(k) for k in ks]


@given(st.lists(st.sampled_from([0.0, 0.25, 0.3, 0.5, 0.75, 1.0]), min_size=1, max_size=4),
       st.integers(1, 4))
def test_a_confidence_grid_keeps_its_options_on_every_value(thresholds, k_min):
    text = "confidence:" + ",".join(map(repr, thresholds)) + f":k_min={k_min}"
    assert parse_policy_grid(text) == [Confidence(t, k_min) for t in thresholds]


def test_single_policies_and_agreement_grids():
    assert parse_policy_grid("local-agreement:2,3:chunk=2") == [LocalAgreement(2, 2),
                                                                 LocalAgreement(3, 2)]
    assert parse_policy_grid("wait-3") == [WaitK(3)]
    assert parse_policy_grid("read-all") == [ReadAll()]
    for bad in ("confidence:0.5,", "wait-k:1,,3", "confidence:2", "nope:1", "wait-k:0"):
        with pytest.raises(ValueError, match="policy"):
            parse_policy_grid(bad)


def _eval_args(k=None, policy=None):
    return argparse.Namespace(k=k, policy=policy)


def test_eval_runs_from_k_and_policy():
    assert _policies(_eval_args()) == (list(evaluate.DEFAULT_KS), [])
    grid = [parse_policy_grid("wait-k:1,3"), parse_policy_grid("confidence:0.3,0.6"),
            parse_policy_grid("local-agreement:2"), parse_policy_grid("read-all")]
    assert _policies(_eval_args(k=[5, 1], policy=grid)) == (
        [5, 1, 3], ["confidence:0.3", "confidence:0.6", "local-agreement:2"])
    # --policy alone: no default wait-k runs beside it.
    assert _policies(_eval_args(policy=[parse_policy_grid("confidence:0.5")])) == (
        [], ["confidence:0.5"])


def test_run_specs_of_policies_name_their_files_and_families():
    specs = evaluate.run_specs(["group"], [3], policies=["confidence:0.5",
                                                          "local-agreement:2:chunk=2"])
    assert [s.name for s in specs] == ["group-k3", "group-confidence-0.5",
                                       "group-local-agreement-2-chunk-2", "offline"]
    assert [s.family for s in specs] == ["wait-k", "confidence", "local-agreement", "offline"]
    assert [s.parameter for s in specs] == ["", "0.5", "2:chunk=2", ""]
    with pytest.raises(ValueError, match="policy"):
        evaluate.RunSpec("group", None, "confidence:7")
    with pytest.raises(ValueError, match="one of them"):
        evaluate.RunSpec("group", 3, "confidence:0.5")


def test_curves_join_each_policy_family():
    def summary(run, k, policy, al, bleu):
        return {"run": run, "layout": "group", "k": k, "policy": policy, "bleu": bleu,
                "latency_reference_length": {"AL": al}}

    curves, offline = evaluate.quality_latency_curves([
        summary("group-k1", 1, "wait-1", 1.0, 10.0), summary("group-k3", 3, "wait-3", 3.0, 20.0),
        summary("c5", None, "confidence:0.5", 2.0, 15.0),
        summary("c9", None, "confidence:0.9", 5.0, 25.0),
        summary("la", None, "local-agreement:2", 4.0, 24.0),
        summary("offline", None, "read-all", 9.0, 30.0)])
    assert curves == {"group wait-k": [(1.0, 10.0, 1), (3.0, 20.0, 3)],
                      "group confidence": [(2.0, 15.0, "0.5"), (5.0, 25.0, "0.9")],
                      "group local-agreement": [(4.0, 24.0, "2")]}
    assert offline == (9.0, 30.0)
    alone, _ = evaluate.quality_latency_curves([summary("group-k1", 1, "wait-1", 1.0, 10.0)])
    assert list(alone) == ["group"]


# --- runs ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [Confidence(0.3), LocalAgreement(2)])
def test_translate_with_a_policy_gives_the_librarys_trace(gguf, capsys, policy):
    assert main(["translate", SENTENCE, "--model", gguf, "--policy", policy.name, "--json",
                 *FAST]) == 0
    (trace,) = read_traces(capsys.readouterr().out)
    model, tokenizer = models.load(gguf)
    expected = decoder.translate(model, tokenizer, SENTENCE, policy=policy,
                                 max_tokens_per_word=4)
    assert trace.without_times().events == expected.without_times().events
    assert trace.settings.option("policy") == policy.name and trace.settings.k is None


def test_a_bad_policy_is_one_line_before_the_model_loads(capsys, monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model loaded"))
    for command in (["translate", SENTENCE], ["watch", SENTENCE], ["eval", "x.tsv"]):
        assert main([*command, "--policy", "confidence:high"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--policy" in err and "threshold" in err


def test_eval_runs_a_policy_grid_and_resumes(gguf, capsys, tmp_path):
    data = tmp_path / "dev.en-fr.tsv"
    data.write_text(TSV)
    out = tmp_path / "out"
    argv = ["eval", str(data), "--model", gguf, "--policy", "wait-k:2",
            "confidence:0.3,0.6", "local-agreement:2", "--out", str(out), *FAST]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "group conf:0.3" in printed and "group la:2" in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in results["runs"]] == [
        "group-k2", "group-confidence-0.3", "group-confidence-0.6", "group-local-agreement-2",
        "offline"]
    assert results["settings"]["policies"] == ["confidence:0.3", "confidence:0.6",
                                               "local-agreement:2"]
    (trace, _) = read_traces(out / "traces-group-confidence-0.6.jsonl")
    assert trace.settings.option("policy") == "confidence:0.6"
    assert (out / "quality-latency-ca.png").is_file()
    before = {p.name: p.read_bytes() for p in (out / "progress").iterdir()}
    assert main(argv) == 0  # resumed: nothing decoded again
    assert {p.name: p.read_bytes() for p in (out / "progress").iterdir()} == before
