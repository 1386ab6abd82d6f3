"""Issue 21, "Reliability, round 2": the command line's faults a hostile user found, each
as a test (in-process through ``main([...])`` on a tiny GGUF model, or as a real
subprocess where the fault is about the process: stdout, signals, argv bytes)."""

from __future__ import annotations

import errno
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

from simulref import models
from simulref.cli import main
from simulref.trace import read_traces

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--max-tokens-per-word", "4"]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> str:
    from tiny_gguf import write_tiny_gguf

    return str(write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", seed=1))


@pytest.fixture(scope="module")
def adapter(gguf, tmp_path_factory):
    """An (untrained) LoRA adapter directory for the tiny GGUF model."""
    from simulref import finetune

    model, _ = models.load(gguf)
    lora = finetune.LoraConfig(rank=2, num_layers=1)
    finetune.add_lora(model, lora)
    out = tmp_path_factory.mktemp("adapter")
    finetune.save_adapter(model, out, finetune.adapter_config(lora, {"model": "tiny"}))
    return out


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80", "TERM": "xterm",
           "SIMULREF_OPENBLAS": "0"}
    env.pop("FORCE_COLOR", None)
    return env


def simulref(*argv, **options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulref", *argv], env=_env(),
                          timeout=300, **options)


# --- item 1: a resumed eval refuses other settings ------------------------------------


def test_a_resumed_eval_with_another_adapter_or_dtype_is_refused(gguf, data, adapter, tmp_path,
                                                                 capsys):
    out = tmp_path / "eval"
    base = ["eval", data, "--model", gguf, "-k", "2", "--no-offline", "--limit", "1",
            "--batch-size", "1", "--out", str(out), *FAST]
    assert main([*base, "--adapter", str(adapter)]) == 0
    capsys.readouterr()
    settings = json.loads((out / "settings.json").read_text())
    assert settings["dtype"] == "float32" and len(settings["adapter_sha256"]) == 64
    assert main(base) == 2  # the rerun without --adapter of issue 21
    assert "adapter_sha256: stored '" in one_line(capsys.readouterr().err)
    assert main([*base, "--adapter", str(adapter), "--dtype", "bfloat16"]) == 2
    assert "dtype: stored 'float32', now 'bfloat16'" in one_line(capsys.readouterr().err)
    assert main([*base, "--adapter", str(adapter), "-k", "2", "3"]) == 0  # more runs: fine


# --- item 2: an engine for the other kind of source, refused before loading -----------


@pytest.mark.parametrize("argv, message", [
    (["translate", "Hi there.", "--engine", "fused"], "--engine: 'fused' needs a live source"),
    (["watch", "Hi there.", "--engine", "prefilled"],
     "--engine: 'prefilled' needs a source known up front"),
    (["eval", "--dataset", "postgres-en-fr", "--engine", "fused", "--out", "{out}"],
     "--engine: 'fused' needs a live source"),
], ids=["translate-fused", "watch-prefilled", "eval-fused"])
def test_an_engine_that_cannot_run_the_source_exits_2_before_the_model_loads(
        argv, message, tmp_path, capsys, no_model_load):
    out = tmp_path / "out"
    assert main([a.format(out=out) for a in argv]) == 2
    assert message in one_line(capsys.readouterr().err)
    assert not out.exists()  # no .lock, no settings.json


def test_prefilled_on_a_live_stdin_exits_2_before_the_model_loads(monkeypatch, capsys,
                                                                   no_model_load):
    read, write = os.pipe()
    os.write(write, b"hi\n")
    os.close(write)
    with os.fdopen(read, "r") as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        assert main(["translate", "-", "--engine", "prefilled"]) == 2
    assert "'prefilled' needs a source known up front" in one_line(capsys.readouterr().err)


# --- item 3: a damaged or foreign adapter -------------------------------------------------


def test_a_truncated_adapter_exits_2_naming_the_file_before_the_model_loads(
        adapter, tmp_path, capsys, no_model_load):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    weights = broken / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["translate", "a b", "--adapter", str(broken)]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"--adapter {broken}: adapter: {weights}: not a readable safetensors" in line
    (broken / "adapter_config.json").write_text("{not json")
    assert main(["eval", "--dataset", "postgres-en-fr", "--adapter", str(broken),
                 "--out", str(tmp_path / "e")]) == 2
    assert "adapter_config.json: not JSON" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "e").exists()


def test_an_adapter_for_another_base_model_is_one_line_blaming_the_adapter(
        gguf, adapter, tmp_path, capsys):
    import shutil

    import mlx.core as mx

    foreign = tmp_path / "foreign"
    shutil.copytree(adapter, foreign)
    weights = mx.load(str(foreign / "adapters.safetensors"))
    mx.save_safetensors(str(foreign / "adapters.safetensors"),
                        {n: mx.zeros((w.shape[0] * 2, w.shape[1])) for n, w in weights.items()})
    assert main(["translate", "a b", "--model", gguf, "--adapter", str(foreign), *FAST]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"simulref: error: --adapter {foreign}: ") and "does not fit" in line


# --- item 4: an unwritable --out, a full disk ---------------------------------------------


def test_train_out_that_cannot_be_written_exits_2_before_the_model_loads(
        data, tmp_path, capsys, monkeypatch, no_model_load):
    import tempfile

    out = tmp_path / "read-only"
    out.mkdir()
    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if Path(dir) == out:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main(["train", "--data", data, "--batch-size", "2", "--out", str(out)]) == 2
    assert f"--out: {out}: cannot write (Read-only file system)" in one_line(
        capsys.readouterr().err)


def test_train_does_not_make_out_before_the_model_loads(data, tmp_path, capsys,
                                                        no_model_load):
    with pytest.raises(AssertionError, match="a model was loaded"):
        main(["train", "--data", data, "--batch-size", "2", "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


def test_a_full_disk_during_eval_is_one_line_with_its_own_exit_code(gguf, data, tmp_path,
                                                                    capsys, monkeypatch):
    from simulref import atomic

    def full(fd, payload):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "write", full)
    out = tmp_path / "eval"
    assert main(["eval", data, "--model", gguf, "-k", "2", "--no-offline", "--limit", "1",
                 "--batch-size", "1", "--out", str(out), *FAST]) == 74
    err = capsys.readouterr().err  # the batch-size and progress lines, then the error
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(
        "progress/group-k2.jsonl: cannot write (No space left on device)")
    assert not out.exists()  # no record stored: the run leaves nothing behind


def test_a_full_disk_during_train_is_one_line_with_its_own_exit_code(gguf, data, tmp_path,
                                                                     capsys, monkeypatch):
    import mlx.core as mx

    def full(path, arrays, **kwargs):
        raise RuntimeError("[write] Unable to write 94557 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", full)
    out = tmp_path / "adapter"
    assert main(["train", "--model", gguf, "--data", data, "--iters", "1", "--batch-size",
                 "2", "--lora-layers", "1", "--out", str(out)]) == 74
    err = capsys.readouterr().err
    assert "checkpoint.safetensors: cannot write" in err and "Traceback" not in err
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("command", ["models", "trace", "verify"])
def test_stdout_on_a_full_disk_is_one_line_and_exit_74(command, tmp_path):
    from simulref.trace import Finish, Read, Settings, Trace, Write, write_traces

    traces = tmp_path / "t.jsonl"
    write_traces(traces, [Trace(Settings(model="m", k=1, layout="group", system="s"), ("a",),
                                (Read(0, "a", (1,), 0.0), Write(0, "b", (2,), 0.1),
                                 Finish("eos", 0.2)))])
    argv = [command] if command == "models" else [command, str(traces)]
    with open("/dev/full", "wb") as full:
        process = simulref(*argv, stdout=full, stderr=subprocess.PIPE)
    assert process.returncode == 74
    assert "stdout: cannot write (No space left on device)" in one_line(
        process.stderr.decode())


# --- item 6: watch --save keeps the trace whatever stdout does --------------------------


def _finished_trace(path):
    (trace,) = read_traces(path)
    return trace


def test_watch_save_survives_a_closed_stdout(gguf, tmp_path):
    saved = tmp_path / "t.jsonl"
    read, write = os.pipe()
    os.close(read)  # `| true`: the reader is gone before the first frame
    try:
        process = simulref("watch", "Hello world.", "-k", "2", "--model", gguf, "--save",
                           str(saved), *FAST, stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)
    assert process.returncode == 141, process.stderr.decode()
    assert b"Traceback" not in process.stderr
    assert _finished_trace(saved).finish_reason != "cancelled"


def test_watch_save_survives_a_full_stdout(gguf, tmp_path):
    saved = tmp_path / "t.jsonl"
    with open("/dev/full", "wb") as full:
        process = simulref("watch", "Hello world.", "-k", "2", "--model", gguf, "--save",
                           str(saved), *FAST, stdout=full, stderr=subprocess.PIPE)
    assert process.returncode == 74
    assert "stdout: cannot write" in one_line(process.stderr.decode())
    assert _finished_trace(saved).finish_reason != "cancelled"


def test_sigterm_is_handled_like_ctrl_c_exit_143_and_the_trace_is_kept(gguf, tmp_path):
    """A live view on a pseudo-terminal waits for a fourth word; SIGTERM (what `timeout`
    sends): exit 143, the final frame, and the trace saved as cancelled."""
    saved = tmp_path / "t.jsonl"
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "simulref", "watch", "-", "--model", gguf, "-k", "2",
         "--save", str(saved), *FAST],
        stdin=subprocess.PIPE, stdout=slave, stderr=slave, env=_env(), close_fds=True)
    os.close(slave)
    screen = b""

    def read_until(done, deadline: float, what: str) -> None:
        nonlocal screen  # keep draining the terminal, or the child blocks in write()
        while not done():
            assert time.monotonic() < deadline, f"no {what} in ...{screen[-400:]!r}"
            if select.select([master], [], [], 0.2)[0]:
                try:
                    screen += os.read(master, 65536)
                except OSError:
                    return

    try:
        process.stdin.write(b"The weather is ")
        process.stdin.flush()
        # Deadlines are hang guards, not timings.
        read_until(lambda: b"written 1" in screen, time.monotonic() + 120, "'written 1'")
        process.send_signal(signal.SIGTERM)
        read_until(lambda: process.poll() is not None, time.monotonic() + 60, "exit")
        assert process.wait(timeout=10) == 143
    finally:
        process.kill()
        process.stdin.close()
        os.close(master)
    assert b"Traceback" not in screen
    trace = _finished_trace(saved)
    assert trace.finish_reason == "cancelled" and trace.source_words


# --- item 7: TEXT that is not UTF-8 -----------------------------------------------------


@pytest.mark.parametrize("command", ["translate", "watch"])
def test_text_with_bytes_that_are_not_utf8_exits_2(command, capsys, no_model_load):
    # How Linux hands Python the argv bytes b"Hello \xe9t\xe9 world.": surrogate escapes.
    assert main([command, "Hello \udce9t\udce9 world."]) == 2
    assert "TEXT: not UTF-8 (byte 0xe9 at character 7)" in one_line(capsys.readouterr().err)


def test_real_argv_bytes_that_are_not_utf8_exit_2(tmp_path):
    process = subprocess.run([sys.executable.encode(), b"-m", b"simulref", b"translate",
                              b"Hello \xe9t\xe9 world."], env=_env(), capture_output=True,
                             timeout=300)
    assert process.returncode == 2
    assert "TEXT: not UTF-8" in one_line(process.stderr.decode())


# --- item 8: train refuses what translate refuses -----------------------------------------


def test_train_refuses_a_target_start_past_the_context(gguf, data, tmp_path, capsys):
    assert main(["train", "--model", gguf, "--data", data, "--batch-size", "2",
                 "--target-start", "100000", "--out", str(tmp_path / "a")]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--target-start: 100000 puts the target group" in line, line
    assert not (tmp_path / "a").exists()


def test_train_refuses_a_pair_past_the_context_naming_its_line(gguf, data, tmp_path, capsys):
    long = Path(data).read_text() + " ".join(["word"] * 1500) + "\tmot\n"
    Path(data).write_text(long)
    assert main(["train", "--model", gguf, "--data", data, "--batch-size", "2",
                 "--out", str(tmp_path / "a")]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"--data: {data}:5: the pair needs" in line, line


def test_a_held_out_source_with_a_doubled_space_is_refused(data, capsys, tmp_path,
                                                           no_model_load):
    from simulref import databuild

    test_source = sorted(databuild.read_sources(databuild.bundled_test_sets()[0]))[0]
    respaced = test_source.replace(" ", "  ", 1)
    Path(data).write_text(Path(data).read_text() + f"{respaced}\tune phrase\n")
    assert main(["train", "--data", data, "--batch-size", "2",
                 "--out", str(tmp_path / "a")]) == 2
    assert "is held out from training" in one_line(capsys.readouterr().err)


# --- item 9: resume and adapter-preset faults ----------------------------------------------


def test_train_resume_faults(gguf, data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(data).parent)
    name = Path(data).name
    out = tmp_path / "a"
    base = ["train", "--model", gguf, "--batch-size", "2", "--lora-layers", "1",
            "--out", str(out)]
    assert main([*base, "--data", name, "--iters", "2"]) == 0
    # The same data under another path is the same run.
    assert main([*base, "--data", f"./{name}", "--iters", "3", "--resume"]) == 0
    assert "3 steps (resumed at step 2)" in capsys.readouterr().out
    # A resume that would train nothing is refused, before the model loads.
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model loaded"))
    assert main([*base, "--data", name, "--iters", "2", "--resume"]) == 2
    assert "--iters: the checkpoint in" in one_line(capsys.readouterr().err)


def test_train_resume_with_other_settings_names_the_key(gguf, data, tmp_path, capsys):
    out = tmp_path / "a"
    base = ["train", "--model", gguf, "--data", data, "--batch-size", "2", "--lora-layers",
            "1", "--out", str(out)]
    assert main([*base, "--iters", "2"]) == 0
    capsys.readouterr()
    assert main([*base, "--iters", "3", "--resume", "--lr", "0.5"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "(lr: the checkpoint has 0.0001, now 0.5)" in line, line


def test_train_on_an_adapter_preset_exits_2_before_loading_and_makes_no_out(
        data, tmp_path, capsys, no_model_load):
    assert main(["train", "--model", "smollm2-135m-simul-fr", "--data", data,
                 "--batch-size", "2", "--out", str(tmp_path / "a")]) == 2
    assert "--model smollm2-135m-simul-fr: an adapter preset" in one_line(
        capsys.readouterr().err)
    assert not (tmp_path / "a").exists()


# --- item 10: help and messages that say what is true ---------------------------------------


def _help(argv, capsys) -> str:
    assert main([*argv, "--help"]) == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_texts_are_true(capsys):
    assert "fused for a live one" in _help(["translate"], capsys)
    assert "none:" not in _help(["verify"], capsys)
    trace_help = _help(["trace"], capsys)
    assert "as one line" not in trace_help and "R$ source end" in trace_help


def test_models_lists_the_adapter_presets(capsys):
    assert main(["models"]) == 0
    assert "smollm2-135m-simul-fr" in capsys.readouterr().out


def test_word_duration_says_what_it_expects(capsys, no_model_load):
    for value in ("-1", "0"):
        assert main(["eval", "--dataset", "postgres-en-fr", "--word-duration", value]) == 2
        assert "expected a number of seconds > 0" in one_line(capsys.readouterr().err)
