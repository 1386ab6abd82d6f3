"""MLX's Linux CPU wheel with its own reference BLAS against Debian's OpenBLAS preloaded
(1 and 2 threads): float32 SmolLM2-135M, prefill and decode, each in a fresh process
(blas_probe.py). The OpenBLAS variants run twice in mirrored order around the reference
so that drift hits them alike. Where the preload does not apply (not Linux, library not
installed) the result says why instead."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from simulref import blas

PROBE = Path(__file__).with_name("blas_probe.py")
REPO = PROBE.parents[2]
ORDER = ("openblas-2", "openblas-1", "reference", "openblas-1", "openblas-2")


def variant_env(variant: str, library: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "OPENBLAS_NUM_THREADS", blas.ENV_SWITCH)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if variant != "reference":
        env = blas.preload_env(env, library)
        env["OPENBLAS_NUM_THREADS"] = variant.rsplit("-", 1)[1]
    return env


def probe(variant: str, library: str | None) -> dict:
    done = subprocess.run([sys.executable, str(PROBE)], env=variant_env(variant, library),
                          capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_openblas_vs_reference_blas(record, benchmark):
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.ENV_SWITCH)}
    decision = blas.decide(system=sys.platform, machine=platform.machine(), environ=clean,
                           exists=os.path.isfile)
    if decision.library is None:
        record("blas", {"applicable": False, "reason": decision.reason})
        return

    def run():
        return [(variant, probe(variant, decision.library)) for variant in ORDER]

    runs = benchmark.pedantic(run, rounds=1, iterations=1)
    variants: dict[str, dict] = {}
    for variant, result in runs:
        # The preload really served the process (not a silent fallback to the wheel's BLAS).
        assert result["openblas"]["active"] is (variant != "reference"), (variant, result)
        entry = variants.setdefault(variant, {"runs": []})
        entry["runs"].append(result)
    for entry in variants.values():
        for key in ("load_s", "prefill_tps", "decode_tps"):
            entry[key] = statistics.median(r[key] for r in entry["runs"])
    ref = variants["reference"]
    metrics = {
        "applicable": True,
        "library": decision.library,
        "prompt_tokens": ref["runs"][0]["prompt_tokens"],
        "variants": variants,
        "speedup": {v: {"prefill": variants[v]["prefill_tps"] / ref["prefill_tps"],
                        "decode": variants[v]["decode_tps"] / ref["decode_tps"]}
                    for v in variants if v != "reference"},
    }
    record("blas", metrics, model="smollm2-135m", dtype="float32")
    assert set(variants) == set(ORDER)
