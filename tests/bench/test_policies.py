"""Policies that look at the model (docs/policies.md), measured side by side:

- LocalAgreement-2, the draft fast path (``engine="auto"``) against its twin that
  generates every hypothesis token by token (``engine="incremental"``), on sources of
  20 to 40 words (consecutive dev messages joined): the same traces, wall time (A B B A
  per sentence, so the load of a shared machine cancels out), and model calls per
  committed target token;
- Confidence against a count-only policy replaying its schedule, on the same sentences
  (the prefilled engine): model calls per target token written, to show what an
  observing decision costs in forwards.

Figures are ratios measured in the same run; nothing here is a unit test.
"""

from __future__ import annotations

import time

from simulref.cache import TARGET
from simulref.decoder import translate
from simulref.evaluate import dataset_path, read_pairs
from simulref.policy import Confidence, LocalAgreement, WaitK
from simulref.trace import Write

LONG = (20, 40)  # source words
AGREEMENT_SENTENCES = 3
CONFIDENCE_SENTENCES = 12


def long_sources(n: int) -> list[str]:
    """``n`` sources of 20 to 40 words: consecutive dev messages joined until long enough
    (most PostgreSQL messages are shorter)."""
    out, words = [], []
    for pair in read_pairs(dataset_path("postgres-en-fr")):
        words += pair.source.split()
        if len(words) >= LONG[0]:
            if len(words) <= LONG[1]:
                out.append(" ".join(words))
            words = []
        if len(out) == n:
            break
    return out


def _calls(forwards) -> int:
    """Model calls: a fused read reports its source and target chunks separately."""
    return sum(1 for f in forwards if not getattr(f, "fused", False))


def _run(model, tokenizer, source, **options):
    forwards = []
    start = time.perf_counter()
    trace = translate(model, tokenizer, source, on_forward=forwards.append, **options)
    return trace, time.perf_counter() - start, forwards


def _untimed_events(trace):
    return trace.without_times().events


def test_local_agreement_fast_path_against_its_twin(preset, loaded, record, benchmark):
    model, tokenizer, info = loaded(preset)
    sources = long_sources(AGREEMENT_SENTENCES)
    policy = LocalAgreement(2)

    def run():
        rows = []
        for source in sources:
            times = {"auto": 0.0, "incremental": 0.0}
            traces, calls = {}, {}
            for engine in ("auto", "incremental", "incremental", "auto"):  # A B B A
                trace, seconds, forwards = _run(model, tokenizer, source, policy=policy,
                                                engine=engine)
                times[engine] += seconds
                traces.setdefault(engine, trace)
                calls[engine] = _calls(forwards)
            committed = sum(isinstance(e, Write) for e in traces["auto"].events)
            print(f"  {len(source.split())} words: fast {times['auto'] / 2:.1f} s, twin "
                  f"{times['incremental'] / 2:.1f} s, calls {calls['auto']} / "
                  f"{calls['incremental']}", flush=True)
            rows.append({
                "words": len(source.split()), "committed_words": committed,
                "same_trace": _untimed_events(traces["auto"]) == _untimed_events(
                    traces["incremental"]),
                "fast_s": times["auto"] / 2, "twin_s": times["incremental"] / 2,
                "fast_calls": calls["auto"], "twin_calls": calls["incremental"],
                "committed_tokens": sum(len(e.token_ids) for e in traces["auto"].events
                                        if isinstance(e, Write)),
            })
        return rows

    rows = benchmark.pedantic(run, rounds=1, iterations=1)
    fast = sum(r["fast_s"] for r in rows)
    twin = sum(r["twin_s"] for r in rows)
    tokens = sum(r["committed_tokens"] for r in rows) or 1
    summary = {
        "sentences": len(rows), "same_traces": sum(r["same_trace"] for r in rows),
        "speedup": twin / fast,
        "fast_calls_per_committed_token": sum(r["fast_calls"] for r in rows) / tokens,
        "twin_calls_per_committed_token": sum(r["twin_calls"] for r in rows) / tokens,
    }
    print(f"LocalAgreement-2 on {len(rows)} sentences of {LONG[0]}-{LONG[1]} words: "
          f"x{summary['speedup']:.2f} ({twin:.1f} s twin / {fast:.1f} s fast), same traces "
          f"{summary['same_traces']}/{len(rows)}, calls per committed token "
          f"{summary['fast_calls_per_committed_token']:.2f} fast, "
          f"{summary['twin_calls_per_committed_token']:.2f} twin")
    record("local_agreement", {"summary": summary, "sentences": rows}, **info)
    assert rows and all(r["committed_words"] > 0 for r in rows)


def test_an_observing_decision_costs_no_forward(preset, loaded, record, benchmark):
    """Confidence's target forwards against a count-only policy that replays its schedule
    (Scripted(its delays): the same trace, by test_a_look_changes_nothing), and wait-3's
    for scale, per target token written. The one cost a look has: before the first word,
    a look followed by a read feeds the header for nothing (it is taken back), counted
    here as ``header_looks``."""
    from simulref.policy import Scripted
    from simulref.trace import Look

    model, tokenizer, info = loaded(preset)
    sources = long_sources(CONFIDENCE_SENTENCES)

    def forwards_and_tokens(source, policy):
        trace, _, forwards = _run(model, tokenizer, source, policy=policy)
        target = [f for f in forwards if f.kind == TARGET]
        written = sum(len(e.token_ids) for e in trace.events if isinstance(e, Write))
        return trace, len(target), written

    def run():
        out = {"confidence:0.5": [0, 0], "replay": [0, 0], "wait-3": [0, 0]}
        header_looks = same = 0
        for source in sources:
            trace, calls, written = forwards_and_tokens(source, Confidence(0.5))
            out["confidence:0.5"][0] += calls
            out["confidence:0.5"][1] += written
            first_write = next((i for i, e in enumerate(trace.events)
                                if isinstance(e, Write)), len(trace.events))
            header_looks += sum(1 for e in trace.events[:first_write] if isinstance(e, Look))
            replay, calls, written = forwards_and_tokens(source, Scripted(trace.delays))
            same += replay.delays == trace.delays
            out["replay"][0] += calls
            out["replay"][1] += written
            _, calls, written = forwards_and_tokens(source, WaitK(3))
            out["wait-3"][0] += calls
            out["wait-3"][1] += written
        return {name: {"target_calls": c, "target_tokens_written": w,
                       "calls_per_token": c / max(w, 1)} for name, (c, w) in out.items()}, \
            header_looks, same

    out, header_looks, same = benchmark.pedantic(run, rounds=1, iterations=1)
    ratio = out["confidence:0.5"]["calls_per_token"] / out["replay"]["calls_per_token"]
    print(f"model calls per target token written: confidence:0.5 "
          f"{out['confidence:0.5']['calls_per_token']:.3f}, its schedule replayed count-only "
          f"{out['replay']['calls_per_token']:.3f} (x{ratio:.3f}; same schedule "
          f"{same}/{len(sources)}; looks before the first word {header_looks}), wait-3 "
          f"{out['wait-3']['calls_per_token']:.3f}")
    record("confidence_forwards", {"policies": out, "ratio": ratio, "header_looks": header_looks,
                                   "same_schedule": same, "sentences": len(sources)}, **info)
    assert all(v["target_tokens_written"] > 0 for v in out.values())
