"""One model call against PyTorch's, side by side (docs/performance.md, "A model call
against PyTorch"): a prefill of the same ~60-token prompt and one decode step, float32,
at 1 and 2 threads, each side in a fresh process (step_probe.py):

- MLX through mlx-lm, and simulref's engine (one target token per call), with each BLAS
  this machine has for MLX's CPU backend: Debian's OpenBLAS, MKL from the ``mkl`` wheel;
- transformers' model in torch on the same GGUF weights (transformers dequantizes them).

Processes run in mirrored order (A B C ... C B A) so that drift hits every side alike; the
figures are medians of the two runs. Both sides must agree on the prompt's greedy token
(the same weights), and the decode steps feed the same tokens.

Needs ``torch`` and ``transformers`` (``pip install -e .[bench]``); without them the
result says so instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from simulref import blas

PROBE = Path(__file__).with_name("step_probe.py")
REPO = PROBE.parents[2]
THREADS = (1, 2)
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


def blas_libraries() -> dict[str, str]:
    """The BLAS libraries MLX's CPU backend can run with here, by name."""
    out = {}
    mkl = blas.python_mkl(sys.prefix, os.path.isfile)
    if mkl is not None:
        out["mkl"] = mkl
    import platform

    openblas = blas.debian_openblas(platform.machine())
    if openblas is not None and os.path.isfile(openblas):
        out["openblas"] = openblas
    return out


def side_env(library: str | None, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", blas.ENV_SWITCH, *THREAD_VARIABLES)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name in THREAD_VARIABLES:
        env[name] = str(threads)
    env[blas.ENV_SWITCH] = "0"  # the probe is not re-executed: the preload is set here
    if library is not None:
        env = blas.preload_env(env, library)
    return env


def probe(framework: str, preset: str, threads: int, library: str | None,
          tokens: list[int] | None = None) -> dict:
    argv = [sys.executable, str(PROBE), framework, preset, str(threads)]
    if tokens is not None:
        argv.append(json.dumps(tokens))
    done = subprocess.run(argv, env=side_env(library, threads), capture_output=True,
                          text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{framework} probe failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def test_a_model_call_against_torch(preset, record, benchmark):
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        record("step_vs_torch", {"applicable": False,
                                 "reason": f"not installed: {', '.join(missing)}"},
               model=preset)
        return
    libraries = blas_libraries()
    sides = [f"mlx-{name}" for name in libraries] + ["torch"]

    def run():
        rows = {}
        for threads in THREADS:
            order = sides + sides[::-1]
            runs: dict[str, list[dict]] = {s: [] for s in sides}
            tokens = None
            for side in order:
                if side == "torch":
                    result = probe("torch", preset, threads, None, tokens)
                else:
                    result = probe("mlx", preset, threads, libraries[side[4:]])
                    tokens = tokens or result["tokens"]
                runs[side].append(result)
                print(f"  {preset} {threads} thread(s) {side}: step "
                      f"{result['step_ms']:.1f} ms, prefill {result['prefill_ms']:.0f} ms",
                      flush=True)
            rows[threads] = runs
        return rows

    rows = benchmark.pedantic(run, rounds=1, iterations=1)
    table = {}
    for threads, runs in rows.items():
        torch_step = _median(runs["torch"], "step_ms")
        torch_prefill = _median(runs["torch"], "prefill_ms")
        entry = {"torch": {"step_ms": torch_step, "prefill_ms": torch_prefill,
                           "parts": runs["torch"][0]["parts"]}}
        for side, side_runs in runs.items():
            if side == "torch":
                continue
            step = _median(side_runs, "step_ms")
            entry[side] = {
                "step_ms": step, "engine_step_ms": _median(side_runs, "engine_step_ms"),
                "prefill_ms": _median(side_runs, "prefill_ms"),
                "parts": {k: statistics.median(r["parts"][k] for r in side_runs)
                          for k in side_runs[0]["parts"]},
                "step_vs_torch": step / torch_step,
                "engine_vs_torch": _median(side_runs, "engine_step_ms") / torch_step,
                "prefill_vs_torch": _median(side_runs, "prefill_ms") / torch_prefill,
                "same_argmax": all(r["argmax"] == runs["torch"][0]["argmax"]
                                   for r in side_runs),
            }
        table[str(threads)] = entry
    record("step_vs_torch", {"applicable": True, "threads": table,
                             "libraries": libraries,
                             "prompt_tokens": rows[THREADS[0]]["torch"][0]["prompt_tokens"]},
           model=preset, dtype="float32")
    for entry in table.values():
        for side, figures in entry.items():
            if side != "torch":
                assert figures["same_argmax"], (side, "the two sides' weights differ")
