"""Count hangs at exit: run a command N times, each under a timeout (issue 14, fault 1).

    python tests/bench/exit_hang.py --runs 300 --timeout 60 -- \
        simulref translate "Hello world." -k 2 --model smollm2-135m

A run that outlives ``--timeout`` counts as a hang; with ``--stacks DIR`` the stacks of
all its threads are dumped there with gdb (when installed) before it is killed, so a
hang can be diagnosed and not only counted. Prints one summary line (runs, hangs,
failures, median seconds) and exits 1 when any run hung.

Not a unit test: it takes minutes and measures the machine as much as the code. The
cheap variant runs a minimal MLX + OpenBLAS process instead of a whole translation:

    python tests/bench/exit_hang.py --runs 2000 --timeout 20 -- \
        python -m simulref.blas python tests/bench/exit_hang_probe.py
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path


def dump_stacks(pid: int, path: Path) -> None:
    """All threads' backtraces of process ``pid`` into ``path`` (gdb, batch mode)."""
    gdb = shutil.which("gdb")
    if gdb is None:
        path.write_text("gdb not installed\n")
        return
    result = subprocess.run([gdb, "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
                            capture_output=True, text=True, timeout=120)
    path.write_text(result.stdout + result.stderr)


def run_once(command: list[str], timeout: float, stacks: Path | None,
             number: int) -> tuple[str, float]:
    """("ok" | "hang" | "failed rc=N", seconds) for one run of ``command``."""
    start = time.monotonic()
    # A session of its own, so the kill reaches anything the command started.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        rc = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if stacks is not None:
            stacks.mkdir(parents=True, exist_ok=True)
            dump_stacks(process.pid, stacks / f"hang-{number:04d}.txt")
        process.send_signal(signal.SIGKILL)
        process.wait()
        return "hang", time.monotonic() - start
    seconds = time.monotonic() - start
    return ("ok" if rc == 0 else f"failed rc={rc}"), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per run")
    parser.add_argument("--stacks", type=Path, default=None,
                        help="directory for gdb stack dumps of hung runs")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.runs < 1 or args.timeout <= 0:
        parser.error("give --runs >= 1, --timeout > 0 and a command after --")
    outcomes: dict[str, int] = {}
    seconds = []
    for number in range(1, args.runs + 1):
        outcome, took = run_once(command, args.timeout, args.stacks, number)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        seconds.append(took)
        if outcome != "ok":
            print(f"run {number}: {outcome} after {took:.1f} s", file=sys.stderr, flush=True)
        elif number % 50 == 0:  # a sign of life on long counts
            print(f"run {number}: {outcomes.get('hang', 0)} hang(s) so far", file=sys.stderr,
                  flush=True)
    hangs = outcomes.get("hang", 0)
    failed = sum(n for o, n in outcomes.items() if o.startswith("failed"))
    print(f"runs {args.runs}  hangs {hangs}  failed {failed}  "
          f"median {statistics.median(seconds):.2f} s  max {max(seconds):.2f} s  "
          f"timeout {args.timeout:g} s  command: {' '.join(command)}", flush=True)
    return 1 if hangs else 0


if __name__ == "__main__":
    sys.exit(main())
