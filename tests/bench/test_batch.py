"""Evaluation throughput with batched decoding (simulref.batch): one ``simulref eval`` of
two runs (wait-k, k = 1 and 3, group layout) over the first 32 sentences of
postgres-en-fr, decoded one at a time (batch size 1: ``translate`` per sentence, today's
path) and in batches of 4, 8, 16 and 32 rows (every run's sentences in one continuous
batch, as ``simulref eval --batch-size B`` does), in the same session. Throughput =
target tokens generated / wall time of the whole eval (prefills, joins and the tail of
the last rows included). Every batched trace
is held against the one-at-a-time trace of the same sentence ('agree').
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from simulref.evaluate import (
    Evaluation,
    RunSpec,
    dataset_path,
    default_system,
    load_records,
    read_pairs,
)

BATCH_SIZES = (1, 4, 8, 16, 32)
SENTENCES = 32
KS = (1, 3)


def _untimed(trace_text: str) -> str:
    """A stored trace without its times and the engine that made it."""
    from simulref.trace import Trace

    trace = Trace.from_jsonl(trace_text).without_times()
    extra = {k: v for k, v in trace.settings.extra if k != "engine"}
    from dataclasses import replace

    return replace(trace, settings=replace(trace.settings, extra=extra)).to_jsonl()


def run_eval(model, tokenizer, pairs, batch_size: int) -> dict:
    import mlx.core as mx

    specs = [RunSpec("group", k) for k in KS]
    forwards = []
    with tempfile.TemporaryDirectory() as out:
        settings = {"model": "bench", "system": default_system("postgres-en-fr"),
                    "target_start": "auto", "max_tokens_per_word": 50,
                    "stop_at_first_eos": False, "data_sha256": "bench"}
        job = Evaluation(model=model, tokenizer=tokenizer, pairs=pairs, specs=specs,
                         out=Path(out), settings=settings, batch_size=batch_size,
                         on_batch=forwards.append)
        if hasattr(mx, "reset_peak_memory"):
            mx.reset_peak_memory()
        start = time.perf_counter()
        summaries = job.run()
        seconds = time.perf_counter() - start
        records = [r for spec in specs for r in sorted(
            load_records(Path(out) / spec.progress_file), key=lambda r: r["index"])]
    steps = [f for f in forwards if f.kind == "step"]
    tokens = sum(s["generated_tokens"] for s in summaries)
    return {
        "batch_size": batch_size, "seconds": seconds, "tokens": tokens,
        "tokens_per_s": tokens / seconds, "bleu": [s["bleu"] for s in summaries],
        "steps": len(steps), "joins": sum(f.kind == "join" for f in forwards),
        "busy_rows_per_step": (sum(f.busy for f in steps) / len(steps)) if steps else None,
        "peak_cache_mib": max((f.cache_bytes for f in forwards), default=0) / 2**20,
        "peak_memory_mib": (mx.get_peak_memory() / 2**20
                            if hasattr(mx, "get_peak_memory") else None),
        "traces": [_untimed(r["trace"]) for r in records],
    }


def test_eval_throughput_by_batch_size(preset, loaded, record, benchmark):
    model, tokenizer, info = loaded(preset)
    pairs = read_pairs(dataset_path("postgres-en-fr"))[:SENTENCES]

    def run():
        return [run_eval(model, tokenizer, pairs, b) for b in BATCH_SIZES]

    rows = benchmark.pedantic(run, rounds=1, iterations=1)
    one = rows[0]
    reference = one["traces"]
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / one["tokens_per_s"]
        row["agree"] = sum(a == b for a, b in zip(row.pop("traces"), reference, strict=True))
        print(f"B={row['batch_size']}: {row['seconds']:.1f} s, {row['tokens_per_s']:.1f} "
              f"tok/s, x{row['ratio']:.2f}, agree {row['agree']}/{len(reference)}")
    metrics = {"settings": {"k": list(KS), "layout": "group", "sentences": len(pairs),
                            "items": len(reference),
                            "batch_sizes": list(BATCH_SIZES)},
               "runs": rows}
    record("batch", json.loads(json.dumps(metrics)), **info)
    # What the figures rest on: every run decoded every sentence.
    for row in rows:
        assert row["tokens"] > 0 and row["seconds"] > 0
