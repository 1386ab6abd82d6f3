"""``watch --longform`` / ``translate --longform`` (simulref.cli.longform) on a tiny GGUF
model: per-sentence output and traces, --save appended sentence by sentence (a kill
loses at most the sentence in flight), usage errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulref import models
from simulref.cli import main
from simulref.longform import Longform
from simulref.trace import read_traces

ROOT = Path(__file__).resolve().parents[2]
TEXT = "The weather is nice. I want a car. We go home. It is late"
SENTENCES = [["The", "weather", "is", "nice."], ["I", "want", "a", "car."],
             ["We", "go", "home."], ["It", "is", "late"]]
FAST = ["--max-tokens-per-word", "3", "--context-budget", "120", "-k", "2"]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> str:
    from tiny_gguf import write_tiny_gguf

    return str(write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", seed=1))


@pytest.fixture(scope="module")
def library(gguf):
    """What the library gives for the same options: the finished sentences."""
    model, tokenizer = models.load(gguf)
    run = Longform(model, tokenizer, TEXT, k=2, max_tokens_per_word=3, context_budget=120)
    list(run.events())
    return run.sentences


def test_translate_prints_one_line_per_sentence(gguf, library, capsys):
    assert main(["translate", TEXT, "--longform", "--model", gguf, *FAST]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [s.target for s in library]


def test_translate_json_gives_one_trace_per_sentence(gguf, library, capsys, tmp_path):
    assert main(["translate", TEXT, "--longform", "--json", "--model", gguf, *FAST]) == 0
    path = tmp_path / "out.jsonl"
    path.write_text(capsys.readouterr().out)
    traces = read_traces(path)
    assert [list(t.source_words) for t in traces] == SENTENCES
    assert [t.target_words for t in traces] == [s.target_words for s in library]
    assert [t.settings.option("sentence") for t in traces] == [0, 1, 2, 3]
    assert traces[0].settings.option("longform") is True
    assert traces[-1].finish_reason is not None
    assert all(t.finish_reason is None for t in traces[:-1])


def test_watch_save_holds_every_sentence(gguf, library, tmp_path, capsys):
    saved = tmp_path / "s.jsonl"
    assert main(["watch", TEXT, "--longform", "--save", str(saved), "--model", gguf,
                 *FAST]) == 0
    out = capsys.readouterr().out
    assert out.count("→") == len(library)  # each pair printed when finished (a pipe)
    traces = read_traces(saved)
    assert [t.target_words for t in traces] == [s.target_words for s in library]
    assert [t.settings.option("source_start") for t in traces] == [0, 4, 8, 11]


def test_a_kill_loses_at_most_the_sentence_in_flight(gguf, tmp_path):
    """Three sentences and the start of a fourth through a pipe left open (the decoder
    waits for more), then SIGKILL: the three finished sentences are in the file, whole."""
    saved = tmp_path / "killed.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    process = subprocess.Popen(
        [sys.executable, "-m", "simulref", "watch", "-", "--longform", "--save", str(saved),
         "--model", gguf, *FAST],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        process.stdin.write(b"The weather is nice. I want a car. We go home. It is ")
        process.stdin.flush()
        deadline = time.monotonic() + 240  # a bound on a stuck run, not a timing check
        while time.monotonic() < deadline:
            if saved.exists() and saved.read_text().count('"record": "trace"') >= 3:
                break
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    traces = read_traces(saved)
    assert [list(t.source_words) for t in traces] == SENTENCES[:3]
    for line in saved.read_text().splitlines():
        json.loads(line)  # no torn line


def test_max_history_all_keeps_what_the_budget_holds(gguf, capsys):
    run = Longform(models.load(gguf)[0], models.load(gguf)[1], TEXT, k=2,
                   max_tokens_per_word=3, context_budget=120, max_history=None)
    list(run.events())
    assert main(["translate", TEXT, "--longform", "--max-history", "all", "--model", gguf,
                 *FAST]) == 0
    assert capsys.readouterr().out.splitlines() == [s.target for s in run.sentences]


def test_usage_errors(gguf, capsys):
    assert main(["translate", TEXT, "--longform", "--max-history", "-1", "--model",
                 gguf]) == 2
    assert "--max-history" in capsys.readouterr().err
    assert main(["watch", TEXT, "--longform", "--mode", "trace", "--model", gguf]) == 2
    assert "--mode" in capsys.readouterr().err
    assert main(["translate", TEXT, "--longform", "--context-budget", "100000",
                 "--model", gguf]) == 2
    assert "--context-budget" in capsys.readouterr().err
    assert main(["translate", TEXT, "--longform", "--layout", "interleaved",
                 "--model", gguf, *FAST]) == 2
    assert "layout" in capsys.readouterr().err


def test_eval_longform_scores_documents_next_to_short_form(gguf, capsys, tmp_path):
    data = tmp_path / "dev.en-fr.tsv"
    data.write_text("The weather is nice\tIl fait beau\nI want a car\tJe veux une voiture\n"
                    "We go home\tNous rentrons\n")
    out = tmp_path / "out"
    assert main(["eval", str(data), "--model", gguf, "-k", "1", "2", "--no-offline",
                 "--out", str(out), "--longform", "--doc-size", "2",
                 "--max-tokens-per-word", "3", "--context-budget", "100"]) == 0
    printed = capsys.readouterr().out
    assert "short-form vs long-form" in printed and "long (D=2)" in printed
    rows = json.loads((out / "longform.json").read_text())
    assert [(r["k"], r["documents"], r["sentences"]) for r in rows] == [(1, 2, 3), (2, 2, 3)]
    assert all("LongYAAL" in r and "BLEU" in r for r in rows)
    assert all(r["turns"] and r["max_history"] == 0 for r in rows)
    for suffix in ("png", "svg"):
        assert (out / f"longform-quality-latency.{suffix}").stat().st_size > 0
    assert "longform-quality-latency.png" in printed
    assert main(["eval", str(data), "--model", gguf, "--layout", "interleaved",
                 "--out", str(tmp_path / "o2"), "--longform"]) == 2
    assert "--longform" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["translate", "watch"])
@pytest.mark.parametrize(("options", "named"), [
    (["--policy", "local-agreement:2"], "--policy: LocalAgreement"),
    (["--layout", "interleaved"], "--layout"),
    (["--engine", "prefilled"], "--engine"),
    (["--stop-at-first-eos"], "--max-new-words, --stop-at-first-eos"),
])
def test_long_form_refusals_come_before_the_model_loads(command, options, named, no_model_load,
                                                        capsys):
    assert main([command, TEXT, "--longform", *options]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
