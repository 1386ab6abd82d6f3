"""Total time against source length: the group layout (one cache, each word fed once)
grows about linearly; reencode (the whole cache rebuilt at every read, the slow and
obviously-correct baseline) about quadratically. The two layouts run in lockstep, a few
source words at a time, so that drift hits both alike."""

from __future__ import annotations

from benchlib import measure_lengths, scaling_summary

from simulref.evaluate import dataset_path, read_pairs

MODEL = "smollm2-135m"  # the small preset: reencode at 80 words is already minutes on a CPU
K = 3
MAX_TOKENS_PER_WORD = 8  # bounds the work of a rambling model; both layouts alike


def source_words(n: int) -> list[str]:
    words: list[str] = []
    for pair in read_pairs(dataset_path("postgres-en-fr")):
        words.extend(pair.source.split())
        if len(words) >= n:
            return words[:n]
    raise ValueError(f"lengths: the bundled data has fewer than {n} words")


def test_scaling_group_vs_reencode(loaded, lengths, record, benchmark):
    model, tokenizer, info = loaded(MODEL)

    def run():
        rows = []
        for i, n in enumerate(sorted(lengths)):
            layouts = ("group", "reencode") if i % 2 == 0 else ("reencode", "group")
            rows += measure_lengths(model, tokenizer, source_words(n), layouts, K,
                                    MAX_TOKENS_PER_WORD)
        return rows

    rows = benchmark.pedantic(run, rounds=1, iterations=1)
    metrics = scaling_summary(rows)
    metrics["settings"] = {"k": K, "max_new_words": "N - k + 1 (every word read)",
                           "max_tokens_per_word": MAX_TOKENS_PER_WORD}
    record("scaling", metrics, **info)

    # Token counts, not times: reencode feeds the cache again at every read.
    longest = max(lengths)
    assert metrics["reencode_over_group_tokens_fed"] > 1
    assert metrics["longest"] == longest
    assert metrics["reencode"]["tokens_fed_exponent"] > metrics["group"]["tokens_fed_exponent"]
