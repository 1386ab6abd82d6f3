"""Load time, peak memory and decode speed of each model preset in each dtype.

Not a test and not part of `nox -s bench` (it takes minutes per large preset); run by hand:

    python -m simulref.blas python tests/bench/measure_presets.py \
        [--presets smollm2-135m qwen2.5-coder-0.5b] [--dtypes float32 quantized] \
        [--tokens 16] [--out bench/presets.md]     # also writes bench/presets.json

Every (preset, dtype) runs in a fresh process, so peak memory is that of one model:
- load s: wall time of ``simulref.load(preset, dtype)`` with the GGUF file already in the
  cache (run once beforehand to download): parse, dequantize, convert, build the model;
- peak RSS: the process's maximum resident set (``ru_maxrss``), imports included;
- MLX peak: ``mx.get_peak_memory()``, what MLX's allocator held at most (on a GPU this is
  device memory, which RSS does not show);
- decode tok/s: ``mlx_lm.stream_generate``'s ``generation_tps`` over ``--tokens`` tokens
  after the chat prompt of a 27-word sentence, greedy, after a 2-token warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SENTENCE = ("When the committee finally met on Tuesday afternoon, nobody could remember who "
            "had booked the room, so they argued for an hour before anyone opened the agenda.")
PRESETS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
DTYPES = ("float32", "bfloat16", "float16", "quantized")


def measure(preset: str, dtype: str, tokens: int) -> dict:
    """One (preset, dtype) in this process."""
    import mlx.core as mx
    from mlx_lm import stream_generate

    from simulref import load
    from simulref.blas import openblas_status
    from simulref.prompt import DEFAULT_SYSTEM, assemble

    t0 = time.perf_counter()
    model, tokenizer = load(preset, dtype=dtype)
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t0
    for _ in stream_generate(model, tokenizer, "Hello", max_tokens=2):
        pass  # warm-up: kernels compiled, buffers allocated
    prompt = assemble(tokenizer, SENTENCE, system=DEFAULT_SYSTEM)
    ids = mx.array(list(prompt.ids) + list(prompt.template.header_ids))
    last = list(stream_generate(model, tokenizer, ids, max_tokens=tokens))[-1]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if platform.system() == "Darwin" else rss * 1024
    return {
        "preset": preset, "dtype": dtype, "load_s": load_s,
        "peak_rss_bytes": rss_bytes, "mlx_peak_bytes": mx.get_peak_memory(),
        "prompt_tokens": last.prompt_tokens, "prompt_tps": last.prompt_tps,
        "generated_tokens": last.generation_tokens, "decode_tps": last.generation_tps,
        "device": str(mx.default_device()), "mlx": mx.__version__,
        "openblas": bool(openblas_status()),
    }


def table(rows: list[dict]) -> str:
    lines = ["| preset | dtype | load s | peak RSS GiB | MLX peak GiB | prefill tok/s "
             "| decode tok/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['dtype']} | failed: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['preset']} | {r['dtype']} | {r['load_s']:.1f} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['mlx_peak_bytes'] / 2**30:.2f} | "
            f"{r['prompt_tps']:.1f} | {r['decode_tps']:.2f} |")
    done = [r for r in rows if "error" not in r]
    if done:
        prompts = {r["preset"]: r["prompt_tokens"] for r in done}
        lines.append("")
        lines.append(f"{done[0]['device']}, MLX {done[0]['mlx']}, OpenBLAS preloaded: "
                     f"{done[0]['openblas']}; prompt tokens: "
                     + ", ".join(f"{name} {n}" for name, n in prompts.items())
                     + f"; {done[0]['generated_tokens']} tokens decoded.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--child", nargs=2, metavar=("PRESET", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args.tokens)))
        return 0
    rows = []
    for preset in args.presets:
        for dtype in args.dtypes:
            done = subprocess.run(
                [sys.executable, __file__, "--child", preset, dtype, "--tokens",
                 str(args.tokens)], capture_output=True, text=True)
            if done.returncode:
                error = (done.stderr.strip().splitlines() or ["?"])[-1]
                rows.append({"preset": preset, "dtype": dtype, "error": error})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.out is not None:
        from simulref.atomic import atomic_write

        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.out, text=True) as handle:
            handle.write(text)
        with atomic_write(args.out.with_suffix(".json"), text=True) as handle:
            handle.write(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
