"""Run by test_openblas_speed.py in a fresh process (LD_PRELOAD works at start only):
load SmolLM2-135M in float32 on the CPU, then measure mlx-lm's prefill and decode.
Prints one JSON object on stdout."""

from __future__ import annotations

import json
import statistics
import sys
import time

PRESET = "smollm2-135m"
# The golden suite's "long" sentence: a prompt of ~50 tokens.
SENTENCE = ("When the committee finally met on Tuesday afternoon, nobody could remember who "
            "had booked the room, so they argued for an hour before anyone opened the agenda.")
DECODE_TOKENS = 16


def main() -> int:
    t0 = time.perf_counter()
    import mlx.core as mx
    from mlx_lm import stream_generate

    from simulref import load
    from simulref.blas import openblas_status
    from simulref.prompt import DEFAULT_SYSTEM, assemble

    mx.set_default_device(mx.cpu)  # the BLAS in question serves MLX's CPU backend only
    model, tokenizer = load(PRESET, dtype="float32")
    load_s = time.perf_counter() - t0
    for _ in stream_generate(model, tokenizer, "Hello", max_tokens=2):
        pass  # warm-up
    prompt = assemble(tokenizer, SENTENCE, system=DEFAULT_SYSTEM)
    ids = mx.array(list(prompt.ids) + list(prompt.template.header_ids))
    times, prompt_tps = [], None
    for response in stream_generate(model, tokenizer, ids, max_tokens=DECODE_TOKENS + 1):
        times.append(time.perf_counter())
        prompt_tps = response.prompt_tps
    steps = [b - a for a, b in zip(times, times[1:], strict=False)]
    print(json.dumps({
        "load_s": load_s,
        "prompt_tokens": int(ids.size),
        "prefill_tps": prompt_tps,
        "decode_tps": len(steps) / sum(steps),
        "decode_step_median_s": statistics.median(steps),
        "device": str(mx.default_device()),
        "openblas": openblas_status(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
