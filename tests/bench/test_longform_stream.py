"""Long-form streams (docs/longform.md), the goals of the long-form issue, as figures:

- a 2,000-sentence stream through a tiny model (built here, random weights): the KV cache
  slots, MLX's active memory and the time per word read over the last 10% of the stream
  against the first 10%;
- a real preset on a document of 100 consecutive dev sentences, read as a live stream:
  read-to-write latency (from a word's read to the next word written) over the last 20
  sentences against the first 20;
- long-form against short-form BLEU at k = 3 on the same dev sentences (documents of 10
  sentences, the references resegmented as OmniSTEval does).

Figures are ratios measured in the same run; nothing here is a unit test.
"""

from __future__ import annotations

import statistics
import time

from simulref.longform import Longform, SentenceDone
from simulref.trace import Read, Write

STREAM_SENTENCES = 2000
DOCUMENT_SENTENCES = 100
BLEU_SENTENCES = 50
DOC_SIZE = 10


def _window(values, first: bool, share: float):
    n = max(1, int(len(values) * share))
    return values[:n] if first else values[-n:]


def test_a_long_stream_stays_flat(record, benchmark):
    import mlx.core as mx

    from simulref.testing import tiny_model, tiny_tokenizer

    model, tokenizer = tiny_model("llama", 0), tiny_tokenizer()
    pattern = "The dog runs home. A cat sits here now. We go there fast!".split()
    sentences_per_pattern = 3
    words = pattern * (STREAM_SENTENCES // sentences_per_pattern + 1)

    def run():
        # Every pair the budget holds is kept (max_history=None): the budget's evictions
        # are what bound the memory here (the default keeps none).
        session = Longform(model, tokenizer, words, k=2, max_tokens_per_word=2,
                           context_budget=256, max_history=None)
        rows, last_read, word_times = [], None, []
        for event in session.events():
            if isinstance(event, Read):
                now = time.perf_counter()
                if last_read is not None:
                    word_times.append(now - last_read)
                last_read = now
            elif isinstance(event, SentenceDone):
                rows.append({"slots": session.slots,
                             "cache_columns": session._run.engine.caches[0].keys.shape[2],
                             "active_bytes": mx.get_active_memory(),
                             "position": session.max_position})
                if len(rows) >= STREAM_SENTENCES:
                    break
        return rows, word_times

    rows, word_times = benchmark.pedantic(run, rounds=1, iterations=1)
    ratios = {}
    for key in ("slots", "cache_columns", "active_bytes", "position"):
        first = max(r[key] for r in _window(rows, True, 0.1))
        last = max(r[key] for r in _window(rows, False, 0.1))
        ratios[f"peak_{key}_last_over_first"] = last / first
    first_t = statistics.median(_window(word_times, True, 0.1))
    last_t = statistics.median(_window(word_times, False, 0.1))
    ratios["time_per_word_last_over_first"] = last_t / first_t
    print(f"{len(rows)} sentences, {len(word_times) + 1} words: "
          + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    record("longform_flat", {"sentences": len(rows), "words": len(word_times) + 1,
                             "context_budget": 256, **ratios,
                             "median_word_s_first": first_t, "median_word_s_last": last_t},
           model="tiny-llama")
    assert len(rows) == STREAM_SENTENCES


def _dev_pairs(n: int):
    from simulref.evaluate import dataset_path, read_pairs

    return read_pairs(dataset_path("postgres-en-fr"))[:n]


def test_read_to_write_latency_does_not_drift(preset, loaded, record, benchmark):
    model, tokenizer, info = loaded(preset)
    pairs = _dev_pairs(DOCUMENT_SENTENCES)
    words = [w for p in pairs for w in p.source.split()]
    starts, offset = [], 0
    for p in pairs:
        starts.append(offset)
        offset += len(p.source.split())

    def run():
        # A generator: the fused engine's live source, one word pulled per read.
        session = Longform(model, tokenizer, iter(words), k=3, sentence_starts=starts)
        latencies: list[list[float]] = []
        pending = None
        for event in session.events():
            if isinstance(event, Read):
                pending = time.perf_counter() if pending is None else pending
                if len(latencies) < len(session.pairs):
                    latencies.append([])
            elif isinstance(event, Write) and pending is not None:
                latencies[-1].append(time.perf_counter() - pending)
                pending = None
        return latencies, session

    latencies, session = benchmark.pedantic(run, rounds=1, iterations=1)
    first = [x for s in latencies[:20] for x in s]
    last = [x for s in latencies[-20:] for x in s]
    silent = [i for i, s in enumerate(latencies) if not s]  # sentences with no write
    median = {name: statistics.median(v) if v else None
              for name, v in (("first", first), ("last", last))}
    ratio = (median["last"] / median["first"]) if first and last else None
    print(f"{preset}: {len(latencies)} sentences ({len(silent)} without a write: {silent}); "
          f"read-to-write median first 20 {median['first']} s, last 20 {median['last']} s "
          f"(x{ratio}); peak context {session.peak_context} tokens, budget "
          f"{session.context_budget}, max_history {session.max_history}")
    record("longform_latency", {"sentences": len(latencies), "ratio_last_over_first": ratio,
                                "median_first_s": median["first"],
                                "median_last_s": median["last"],
                                "sentences_without_a_write": silent,
                                "peak_context": session.peak_context, "turns": session.turns,
                                "max_history": session.max_history,
                                "context_budget": session.context_budget}, **info)
    assert len(latencies) == DOCUMENT_SENTENCES


def test_long_form_against_short_form_bleu(preset, loaded, record, benchmark):
    from simulref import quality
    from simulref.batch import translate_batch
    from simulref.config import DecodeConfig
    from simulref.documents import build_documents
    from simulref.longform import translate_document
    from simulref.longform_metrics import longform_scores

    model, tokenizer, info = loaded(preset)
    pairs = _dev_pairs(BLEU_SENTENCES)
    config = DecodeConfig(k=3)

    def run():
        traces = translate_batch(model, tokenizer, [p.source for p in pairs], config,
                                 batch_size=16)
        short = quality.corpus_bleu([t.target_text for t in traces],
                                    [p.reference for p in pairs])
        documents = build_documents(pairs, DOC_SIZE)
        # The default (no finished pair kept), every pair the budget holds, one turn.
        layouts = {"default": {}, "all_pairs": {"max_history": None},
                   "one_turn": {"turns": False, "max_history": None}}
        long = {name: longform_scores([translate_document(model, tokenizer, d, config,
                                                          **options)[0]
                                       for d in documents])
                for name, options in layouts.items()}
        return short, long

    short, long = benchmark.pedantic(run, rounds=1, iterations=1)
    scores, all_pairs, one_turn = long["default"], long["all_pairs"], long["one_turn"]
    print(f"{preset} k=3 on {len(pairs)} sentences: short-form BLEU {short:.2f}, long-form "
          f"(documents of {DOC_SIZE}) {scores['BLEU']:.2f} ({scores['BLEU'] - short:+.2f}), "
          f"every pair kept {all_pairs['BLEU']:.2f}, in one turn {one_turn['BLEU']:.2f}")
    record("longform_bleu", {"sentences": len(pairs), "doc_size": DOC_SIZE, "k": 3,
                             "short_bleu": short, "long_bleu": scores["BLEU"],
                             "difference": scores["BLEU"] - short,
                             "long_chrf": scores.get("chrF"), "short_layout": "sentence",
                             "all_pairs_bleu": all_pairs["BLEU"],
                             "one_turn_bleu": one_turn["BLEU"],
                             "empty_segments": scores["empty_segments"],
                             "one_turn_empty_segments": one_turn["empty_segments"]}, **info)
    assert scores["sentences"] == all_pairs["sentences"] == one_turn["sentences"] == len(pairs)
