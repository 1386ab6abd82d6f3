"""Decode throughput, read-to-write latency, prefill and the extra forwards of wait-k,
simulref's decoder against ``mlx_lm.stream_generate`` in lockstep (see benchlib).

Per sentence, three runs advance alternately by blocks of ``--bench-block`` tokens:
mlx-lm on the full chat prompt, simulref with k >= N (everything read first: the same
tokens) and simulref wait-k (k = 3). Figures are ratios of paired blocks, so the load of
a shared machine cancels out.
"""

from __future__ import annotations

import math

from benchlib import SentenceSettings, aggregate_sentences, measure_sentence

from simulref.evaluate import dataset_path, read_pairs

# Three of the golden suite's sentences (tests/golden/goldens.py: short, fox, numbers).
FIXED = (
    "The weather is nice today.",
    "The quick brown fox jumps over the lazy dog.",
    "In 2023, 42 people paid $3.50 each for 7 tickets.",
)
PER_SENTENCE_KEYS = ("words", "same_tokens", "offline_tokens", "offline_finish",
                     "waitk_tokens", "waitk_words", "waitk_finish", "extra_target_forwards",
                     "first_read_tokens", "first_read_tps", "first_read_tps_mlx_lm",
                     "full_prompt_tokens", "full_prompt_tps", "full_prompt_tps_mlx_lm",
                     "reference_step_s")


def sentences(n_postgres: int) -> list[str]:
    pairs = read_pairs(dataset_path("postgres-en-fr"))[:n_postgres]
    return [*FIXED, *(p.source for p in pairs)]


def test_decode_side_by_side(preset, loaded, sentence_count, block, record, benchmark):
    model, tokenizer, info = loaded(preset)
    texts = sentences(sentence_count.get(preset, 0))
    settings = SentenceSettings(block=block)

    def run():
        return [measure_sentence(model, tokenizer, text.split(), settings) for text in texts]

    rows = benchmark.pedantic(run, rounds=1, iterations=1)
    metrics = aggregate_sentences(rows)
    metrics["settings"] = {"k": settings.k, "block": settings.block,
                           "max_new_words": f"N + {settings.extra_words}",
                           "max_tokens_per_word": settings.max_tokens_per_word,
                           "fixed_sentences": len(FIXED),
                           "postgres_sentences": len(texts) - len(FIXED)}
    metrics["per_sentence"] = [{k: row[k] for k in PER_SENTENCE_KEYS} for row in rows]
    record("decode", metrics, **info)

    # What the figures rest on (not timings): every sentence gave paired blocks, and the
    # rates are finite and positive.
    assert metrics["decode_ratio"]["n"] >= len(texts)
    assert metrics["waitk_ratio"]["n"] >= 1
    for key in ("decode_tps", "decode_tps_mlx_lm", "waitk_tps"):
        assert 0 < metrics[key] < math.inf, key
    assert metrics["latency_steps"]["n"] >= 1
