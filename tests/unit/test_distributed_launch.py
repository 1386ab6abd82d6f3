"""``simulref eval`` over two ranks on this machine, as real processes on MLX's ring
backend: under ``mlx.launch -n 2 --backend ring`` (a shared output directory), and
started the way mlx.launch starts its ranks (``MLX_RANK``, ``MLX_HOSTFILE``) but each in a
directory of its own (no shared filesystem: the records go over mx.distributed). The
results must equal a single process's, record for record (times aside); a rank killed
mid-run, then a resume with one or two ranks, must give the same results too.

A tiny GGUF model (tests/unit/tiny_gguf.py) keeps each run to seconds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulref.cli import main
from simulref.evaluate import run_records, run_specs
from simulref.trace import Trace, read_traces

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--max-tokens-per-word", "4"]
LAUNCH = Path(sys.executable).with_name("mlx.launch")

# The ring backend's launcher is POSIX-only; elsewhere these tests cannot run. Where it
# can run, a missing mlx.launch (it ships with the mlx package, a dependency) is a broken
# install and fails the tests below rather than skipping them.
pytestmark = pytest.mark.skipif(sys.platform == "win32",
                                reason="mlx.launch's ring backend needs a POSIX system")


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> str:
    from tiny_gguf import write_tiny_gguf

    return str(write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", seed=1))


def _data(path: Path, sentences: int) -> Path:
    lines = (ROOT / "simulref" / "data" / "postgres-en-fr.tsv").read_text("utf-8").splitlines()
    path.write_text("\n".join(lines[:sentences]) + "\n", encoding="utf-8")
    return path


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")}
    # One thread per rank: two ranks on a small machine do not fight over its cores.
    return env | {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                  "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"}


def _free_ports(count: int) -> int:
    """A first port with ``count`` free ports from it (the ring backend takes one per
    rank, counting up)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count >= 65536:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    pytest.fail("no free local ports for the ring backend in 50 tries")


def _eval_args(data: Path, out: Path | str, gguf: str, *extra: str) -> list[str]:
    return ["eval", str(data), "--model", gguf, "-k", "1", "3", "--out", str(out), *FAST,
            *extra]


def _launch(args: list[str], cwd: Path, ranks: int = 2) -> subprocess.Popen:
    """``mlx.launch -n RANKS --backend ring -- python -m simulref ARGS``."""
    launcher = str(LAUNCH) if LAUNCH.exists() else shutil.which("mlx.launch")
    assert launcher, "mlx.launch not found (it comes with the mlx package)"
    command = [launcher, "-n", str(ranks), "--backend", "ring", "--starting-port",
               str(_free_ports(ranks)), "--", sys.executable, "-m", "simulref", *args]
    return subprocess.Popen(command, cwd=cwd, env=_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, timeout: float = 240) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"timed out:\n{output}")
    return output


def _single(gguf: str, data: Path, out: Path, *extra: str) -> None:
    assert main(_eval_args(data, out, gguf, *extra)) == 0


# --- what must be equal --------------------------------------------------------------------


def _records(out: Path) -> dict:
    """{(run, sentence): (trace without times, generated tokens)} over every progress
    file of ``out``."""
    specs = run_specs(["group"], [1, 3])
    return {(spec.name, r["index"]): (Trace.from_jsonl(r["trace"]).without_times(),
                                      r["generated_tokens"])
            for spec in specs for r in run_records(out, spec)}


def _results(out: Path) -> dict:
    """results.json without what depends on wall time."""
    results = json.loads((out / "results.json").read_text())
    for run in results["runs"]:
        del run["seconds"], run["tokens_per_s"]
        run["latency_reference_length"] = {
            k: v for k, v in run["latency_reference_length"].items() if not k.endswith("_CA")}
    results["settings"].pop("data")  # the path as given
    return results


def _traces(out: Path) -> dict:
    return {name: [t.without_times() for t in read_traces(out / name)]
            for name in ("traces-group-k1.jsonl", "traces-group-k3.jsonl",
                         "traces-offline.jsonl")}


def _assert_same(out: Path, single: Path) -> None:
    assert _records(out) == _records(single)
    assert _results(out) == _results(single)
    assert _traces(out) == _traces(single)


# --- the tests -----------------------------------------------------------------------------


def test_two_ranks_under_mlx_launch_give_a_single_process_s_results(gguf, tmp_path):
    data = _data(tmp_path / "dev.tsv", 8)
    _single(gguf, data, tmp_path / "single", "--batch-size", "3")
    out = tmp_path / "two"
    output = _finish(_launch(_eval_args(data, out, gguf, "--batch-size", "3"), tmp_path))
    assert "rank 0/2: 2 ranks; records gathered through the shared output directory" in output
    assert "rank 1/2: done; rank 0 writes the results" in output
    _assert_same(out, tmp_path / "single")
    # Rank 1 decoded its share into files of its own; rank 0 wrote everything else.
    progress = sorted(p.name for p in (out / "progress").iterdir())
    assert progress == sorted(f"{run}{rank}.jsonl" for run in ("group-k1", "group-k3",
                                                               "offline")
                              for rank in ("", ".rank1"))
    names = {p.name for p in out.iterdir()}
    assert names == {p.name for p in (tmp_path / "single").iterdir()} | {".rank1.lock"}
    shares = [sum(len((out / "progress" / f"{run}{rank}.jsonl").read_text().splitlines())
                  for run in ("group-k1", "group-k3", "offline")) for rank in ("", ".rank1")]
    assert sum(shares) == 24 and min(shares) > 0


def _start_rank(rank: int, hostfile: Path, args: list[str], cwd: Path) -> subprocess.Popen:
    """A rank started as mlx.launch starts one (its MLX_RANK and MLX_HOSTFILE)."""
    env = _env() | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
    return subprocess.Popen([sys.executable, "-m", "simulref", *args], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _hostfile(path: Path, ranks: int) -> Path:
    first = _free_ports(ranks)
    path.write_text(json.dumps([[f"127.0.0.1:{first + r}"] for r in range(ranks)]))
    return path


def test_two_ranks_without_a_shared_directory_gather_over_mx_distributed(gguf, tmp_path):
    """Each rank in a directory of its own, ``--out out`` relative to it: rank 0 cannot
    see rank 1's files, so the records travel over mx.distributed (one at a time here:
    --batch-size 1)."""
    data = _data(tmp_path / "dev.tsv", 6)
    _single(gguf, data, tmp_path / "single", "--batch-size", "1")
    hosts = [tmp_path / "host0", tmp_path / "host1"]
    hostfile = _hostfile(tmp_path / "hosts.json", 2)
    args = _eval_args(data, "out", gguf, "--batch-size", "1")
    ranks = []
    for rank, host in enumerate(hosts):
        host.mkdir()
        ranks.append(_start_rank(rank, hostfile, args, host))
    outputs = [_finish(rank) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert "records gathered over mx.distributed (the ranks do not share --out)" in outputs[0]
    assert "simulref eval: rank 0/2: received" in outputs[0]
    _assert_same(hosts[0] / "out", tmp_path / "single")
    assert not (hosts[1] / "out" / "results.json").exists()  # rank 0 alone writes results


def test_ranks_launched_with_different_settings_are_refused_before_the_model_loads(
        gguf, tmp_path):
    data = _data(tmp_path / "dev.tsv", 2)
    hostfile = _hostfile(tmp_path / "hosts.json", 2)
    ranks = [_start_rank(r, hostfile, _eval_args(data, tmp_path / "out", "absent.gguf",
                                                 "--word-duration", f"0.{r + 4}"), tmp_path)
             for r in range(2)]  # a model that cannot load: it must not get that far
    outputs = [_finish(rank) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [2, 2], outputs
    for rank, output in enumerate(outputs):
        assert output.strip().splitlines()[-1] == (
            f"simulref: error: rank {rank}/2: the ranks were launched with different "
            f"settings (word_duration: rank 0 has 0.4, rank 1 0.5); launch every rank "
            f"with the same command")
    assert not (tmp_path / "out").exists()


def _rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    """The process id of rank ``rank`` of ``mlx.launch``: the child whose environment
    has MLX_RANK=rank (Linux's /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{launcher.pid}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in children:
                try:
                    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"MLX_RANK={rank}".encode() in environ:
                    return int(child)
        time.sleep(0.01)
    pytest.fail(f"rank {rank} of mlx.launch did not start")


def _lines(out: Path, rank: int) -> int:
    suffix = "" if rank == 0 else f".rank{rank}"
    total = 0
    for run in ("group-k1", "group-k3", "offline"):
        path = out / "progress" / f"{run}{suffix}.jsonl"
        total += path.read_bytes().count(b"\n") if path.exists() else 0
    return total


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds ranks through /proc")
@pytest.mark.parametrize("resume_ranks", [1, 2])
def test_a_rank_killed_mid_run_then_a_resume_give_the_same_results(gguf, tmp_path,
                                                                   resume_ranks):
    sentences = 40
    data = _data(tmp_path / "dev.tsv", sentences)
    _single(gguf, data, tmp_path / "single", "--batch-size", "2")
    out = tmp_path / "two"
    args = _eval_args(data, out, gguf, "--batch-size", "2")
    launcher = _launch(args, tmp_path)
    victim = _rank_pid(launcher, 1)
    deadline = time.monotonic() + 120
    while _lines(out, 1) < 2 and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(victim, signal.SIGKILL)  # mlx.launch then stops rank 0 too
    output = _finish(launcher)
    assert "Node with rank 1" in output  # mlx.launch's warning on the killed rank
    done = len(_records(out))
    assert 0 < done < 3 * sentences, output  # killed mid-run: some records, not all
    assert not (out / "results.json").exists()
    kept = _records(out)

    if resume_ranks == 1:  # the same command, one process
        assert main(args) == 0
    else:
        output = _finish(_launch(args, tmp_path))
        assert f"of the {3 * sentences - done} pending items" in output
    # Nothing decoded before the kill was decoded again, and all is as one process has it.
    records = _records(out)
    assert {key: records[key] for key in kept} == kept
    _assert_same(out, tmp_path / "single")
