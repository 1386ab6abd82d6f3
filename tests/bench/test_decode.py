"""Decode throughput, read-to-write latency, prefill and the extra forwards of wait-k,
simulref's decoder against ``mlx_lm.stream_generate`` in lockstep (see benchlib).

Per sentence, runs advance alternately by blocks of ``--bench-block`` tokens: mlx-lm on
the full chat prompt, simulref with k >= N (everything read first: the same tokens) and
simulref wait-k (k = 3) with each engine (incremental, the twin; prefilled, the default
for a known source). Figures are ratios of paired blocks, so the load of a shared machine
cancels out. Then the whole translation, prefill included, against mlx-lm making the same
number of tokens (timed A B B A), and wait-k over a live source (incremental vs fused):
read -> first token of the next word, in mlx-lm decode steps.
"""

from __future__ import annotations

import math

from benchlib import (
    SentenceSettings,
    aggregate_live,
    aggregate_sentences,
    aggregate_whole_runs,
    measure_live,
    measure_sentence,
    measure_whole_run,
)

from simulref.evaluate import dataset_path, read_pairs

# Three of the golden suite's sentences (tests/golden/goldens.py: short, fox, numbers).
FIXED = (
    "The weather is nice today.",
    "The quick brown fox jumps over the lazy dog.",
    "In 2023, 42 people paid $3.50 each for 7 tickets.",
)
PER_SENTENCE_KEYS = ("words", "same_tokens", "offline_tokens", "offline_finish",
                     "engines_agree", "first_read_tokens", "first_read_tps",
                     "first_read_tps_mlx_lm", "full_prompt_tokens", "full_prompt_tps",
                     "full_prompt_tps_mlx_lm", "reference_step_s")
ENGINE_KEYS = ("waitk_tokens", "waitk_words", "waitk_finish", "model_calls",
               "target_forwards", "extra_target_forwards")


def sentences(n_postgres: int) -> list[str]:
    pairs = read_pairs(dataset_path("postgres-en-fr"))[:n_postgres]
    return [*FIXED, *(p.source for p in pairs)]


def test_decode_side_by_side(preset, loaded, sentence_count, block, record, benchmark):
    model, tokenizer, info = loaded(preset)
    texts = sentences(sentence_count.get(preset, 0))
    settings = SentenceSettings(block=block)

    def run():
        rows = []
        for text in texts:
            row = measure_sentence(model, tokenizer, text.split(), settings)
            row["whole"] = measure_whole_run(model, tokenizer, text.split(), settings)
            row["live"] = measure_live(model, tokenizer, text.split(), settings)
            rows.append(row)
        return rows

    rows = benchmark.pedantic(run, rounds=1, iterations=1)
    metrics = aggregate_sentences(rows)
    metrics["whole_run"] = aggregate_whole_runs([r["whole"] for r in rows])
    metrics["live"] = aggregate_live([r["live"] for r in rows],
                                     [r["reference_step_s"] for r in rows])
    metrics["settings"] = {"k": settings.k, "block": settings.block,
                           "max_new_words": f"N + {settings.extra_words}",
                           "max_tokens_per_word": settings.max_tokens_per_word,
                           "fixed_sentences": len(FIXED),
                           "postgres_sentences": len(texts) - len(FIXED)}
    metrics["per_sentence"] = [
        {**{k: row[k] for k in PER_SENTENCE_KEYS},
         "engines": {e: {k: v[k] for k in ENGINE_KEYS} for e, v in row["engines"].items()},
         "whole": row["whole"]} for row in rows]
    record("decode", metrics, **info)

    # What the figures rest on (not timings): every sentence gave paired blocks, the rates
    # are finite and positive, and every engine wrote the same trace.
    assert metrics["decode_ratio"]["n"] >= len(texts)
    assert metrics["engines_agree"] == len(texts)
    assert metrics["live"]["agree"] == len(texts)
    for engine in metrics["engines"].values():
        assert engine["waitk_ratio"]["n"] >= 1
        assert 0 < engine["waitk_tps"] < math.inf
    for key in ("decode_tps", "decode_tps_mlx_lm"):
        assert 0 < metrics[key] < math.inf, key
