"""Run by test_step_vs_torch.py in a fresh process (the BLAS preload and thread counts are
fixed at start): time one prefill and one decode step of a preset in float32, for one
framework, and print one JSON object on stdout.

    python step_probe.py mlx|torch PRESET THREADS

- ``mlx``: mlx-lm's model with its own KV cache (what ``mlx_lm.generate`` runs), then
  simulref's engine (the group-layout incremental engine: one target token per call, as
  the decoder feeds it), then the step split into its parts (below);
- ``torch``: transformers' model of the same GGUF file (transformers dequantizes it to
  float32 itself), with its DynamicCache, under ``torch.inference_mode``; the split comes
  from torch's profiler.

Both sides decode the same token ids after the same prompt and report the prompt's last
logits' argmax and a checksum of them, so the caller can tell that the weights agree.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

# The golden suite's "long" sentence: a prompt of ~60 tokens with the system prompt.
SENTENCE = ("When the committee finally met on Tuesday afternoon, nobody could remember who "
            "had booked the room, so they argued for an hour before anyone opened the agenda.")
STEPS = 24  # decode steps timed (after 4 untimed)
WARMUP = 4
PREFILLS = 5


def prompt_ids(tokenizer) -> list[int]:
    from simulref.prompt import DEFAULT_SYSTEM, assemble

    prompt = assemble(tokenizer, SENTENCE, system=DEFAULT_SYSTEM)
    return list(prompt.ids) + list(prompt.template.header_ids)


def _median_ms(values) -> float:
    return 1000 * statistics.median(values)


# ---------------------------------------------------------------- MLX


def mlx_probe(preset: str) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.cache import make_prompt_cache

    from simulref import load
    from simulref.blas import openblas_status

    mx.set_default_device(mx.cpu)
    model, tokenizer = load(preset, dtype="float32")
    ids = prompt_ids(tokenizer)
    prompt = mx.array(ids)[None]

    prefill = []
    for _ in range(PREFILLS):
        cache = make_prompt_cache(model)
        start = time.perf_counter()
        logits = model(prompt, cache=cache)[:, -1, :]
        mx.eval(logits)
        prefill.append(time.perf_counter() - start)
    last = logits[0].astype(mx.float32)
    tokens = _greedy_tokens_mlx(model, cache, logits)

    # mlx-lm: a step is the call (graph building) then its evaluation.
    cache = make_prompt_cache(model)
    mx.eval(model(prompt, cache=cache))
    build, total = [], []
    for i, token in enumerate(tokens):
        start = time.perf_counter()
        out = model(mx.array([[token]]), cache=cache)[:, -1, :]
        built = time.perf_counter()
        mx.eval(out)
        done = time.perf_counter()
        if i >= WARMUP:
            build.append(built - start)
            total.append(done - start)
    step_ms = _median_ms(total)

    engine_ms = _engine_step_ms(model, tokenizer, ids, tokens)

    # The step's parts: every Linear of the body on one token (one graph), the head alone;
    # what is left is attention, norms, RoPE, cache writes and the graph's bookkeeping.
    linears = []
    for layer in model.model.layers:
        for _, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                linears.append(module)
    xs = {}
    for m in linears:
        d = m.weight.shape[1]
        xs.setdefault(d, mx.random.normal((1, 1, d)))
    mx.eval(list(xs.values()))

    def body():
        return [m(xs[m.weight.shape[1]]) for m in linears]

    d_model = model.args.hidden_size
    h = mx.random.normal((1, 1, d_model))
    mx.eval(h)
    head = (model.lm_head if hasattr(model, "lm_head") and not model.args.tie_word_embeddings
            else model.model.embed_tokens.as_linear)

    parts = {"body_linears_ms": _timed_ms(body), "head_ms": _timed_ms(lambda: head(h)),
             "graph_build_ms": _median_ms(build)}
    parts["rest_ms"] = step_ms - parts["body_linears_ms"] - parts["head_ms"]
    return {
        "framework": "mlx", "mlx": mx.__version__, "device": str(mx.default_device()),
        "blas": openblas_status(), "prompt_tokens": len(ids),
        "prefill_ms": _median_ms(prefill), "step_ms": step_ms, "engine_step_ms": engine_ms,
        "parts": parts, "argmax": int(mx.argmax(last).item()),
        "logits_sum": float(mx.sum(last).item()), "tokens": tokens,
        "logits_head": [float(v) for v in last[:8].tolist()],
    }


def _greedy_tokens_mlx(model, cache, logits) -> list[int]:
    """The greedy continuation after the prompt (the tokens both frameworks feed)."""
    import mlx.core as mx

    out = []
    y = mx.argmax(logits, axis=-1)
    for _ in range(STEPS + WARMUP):
        token = int(y.item())
        out.append(token)
        y = mx.argmax(model(mx.array([[token]]), cache=cache)[:, -1, :], axis=-1)
    return out


def _timed_ms(build) -> float:
    import mlx.core as mx

    for _ in range(WARMUP):
        mx.eval(build())
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        mx.eval(build())
        times.append(time.perf_counter() - start)
    return _median_ms(times)


def _engine_step_ms(model, tokenizer, ids, tokens) -> float:
    """simulref's incremental engine (group layout): the prompt as source, then one target
    token per call, each call's token read back as the decoder reads it."""
    from simulref.engine import IncrementalEngine
    from simulref.prompt import DEFAULT_SYSTEM, template_for

    template = template_for(tokenizer, system=DEFAULT_SYSTEM)
    engine = IncrementalEngine(model, template, layout="group", target_start="auto",
                               sampler=None, on_forward=None, known_source=False)
    n_header = len(template.header_ids)
    engine.start(ids[:-n_header])
    engine.peek()
    times = []
    for i, token in enumerate(tokens):
        start = time.perf_counter()
        engine.accept(token, False)
        engine.peek()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return _median_ms(times)


# ---------------------------------------------------------------- torch


def torch_probe(preset: str, threads: int, tokens: list[int] | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from simulref import load
    from simulref.models import PRESETS, fetch

    torch.set_num_threads(threads)
    path = fetch(PRESETS[preset])
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    model.eval()
    _, tokenizer = load(preset, dtype="float32")
    ids = prompt_ids(tokenizer)
    prompt = torch.tensor([ids])
    prefill = []
    with torch.inference_mode():
        for _ in range(PREFILLS):
            cache = DynamicCache()
            start = time.perf_counter()
            out = model(prompt, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            prefill.append(time.perf_counter() - start)
        last = out.logits[0, -1].float()
        if tokens is None:
            tokens = []
            y = int(last.argmax())
            for _ in range(STEPS + WARMUP):
                tokens.append(y)
                y = int(model(torch.tensor([[y]]), past_key_values=cache,
                              use_cache=True).logits[0, -1].argmax())
        cache = DynamicCache()
        model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        total = []
        for token in tokens[:WARMUP]:
            model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        for token in tokens[WARMUP:]:
            start = time.perf_counter()
            model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            total.append(time.perf_counter() - start)
        parts = _torch_parts(model, cache, tokens)
    return {
        "framework": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "prompt_tokens": len(ids), "prefill_ms": _median_ms(prefill),
        "step_ms": _median_ms(total), "parts": parts, "argmax": int(last.argmax()),
        "logits_sum": float(last.sum()), "logits_head": [float(v) for v in last[:8]],
    }


# Which aten ops make up each part of a step (self CPU time, summed).
TORCH_PARTS = {
    "matmuls_ms": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention_ms": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                     "aten::scaled_dot_product_attention", "aten::_softmax"),
}


def _torch_parts(model, cache, tokens) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    steps = tokens[WARMUP:WARMUP + 8]
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for token in steps:
            model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
    wall = (time.perf_counter() - start) / len(steps)
    by_op: dict[str, float] = {}
    for event in prof.key_averages():
        by_op[event.key] = by_op.get(event.key, 0.0) + event.self_cpu_time_total / 1000
    parts = {name: sum(by_op.get(op, 0.0) for op in ops) / len(steps)
             for name, ops in TORCH_PARTS.items()}
    counted = {op for ops in TORCH_PARTS.values() for op in ops}
    parts["other_ops_ms"] = sum(v for k, v in by_op.items() if k not in counted) / len(steps)
    parts["profiled_step_ms"] = 1000 * wall
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:8]
    parts["top_ops"] = {k: v / len(steps) for k, v in top}
    return parts


def main(argv: list[str]) -> int:
    framework, preset, threads = argv[0], argv[1], int(argv[2])
    tokens = json.loads(argv[3]) if len(argv) > 3 else None
    if framework == "mlx":
        result = mlx_probe(preset)
    elif framework == "torch":
        result = torch_probe(preset, threads, tokens)
    else:
        raise SystemExit(f"framework: expected mlx or torch, got {framework!r}")
    result.update(preset=preset, threads_asked=threads,
                  env={k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                                      "OMP_NUM_THREADS", "LD_PRELOAD")})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
