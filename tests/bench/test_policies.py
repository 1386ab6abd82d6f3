"""Policies that look at the model (docs/policies.md), measured side by side:

- LocalAgreement-2, the draft fast path (``engine="auto"``) against its twin that
  generates every hypothesis token by token (``engine="incremental"``), on sources of
  20 to 40 words (consecutive dev messages joined): the same traces, wall time (A B B A
  per sentence, so the load of a shared machine cancels out), and model calls per
  committed target token;
- Confidence against wait-k on the same sentences (the prefilled engine): model calls per
  target token fed, to show that an observing decision costs no forward.

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
    model, tokenizer, info = loaded(preset)
    sources = long_sources(CONFIDENCE_SENTENCES)
    policies = {"wait-3": WaitK(3), "confidence:0.5": Confidence(0.5)}

    def run():
        out = {}
        for name, policy in policies.items():
            calls = fed = 0
            for source in sources:
                trace, _, forwards = _run(model, tokenizer, source, policy=policy)
                # After the prefill, every call feeds target tokens: per token fed.
                target = [f for f in forwards if f.kind == TARGET]
                calls += len(target)
                fed += sum(int(f.tokens.shape[-1]) for f in target)
            out[name] = {"target_calls": calls, "target_tokens_fed": fed,
                         "calls_per_token": calls / max(fed, 1)}
        return out

    out = benchmark.pedantic(run, rounds=1, iterations=1)
    ratio = out["confidence:0.5"]["calls_per_token"] / out["wait-3"]["calls_per_token"]
    print(f"model calls per target token fed: wait-3 {out['wait-3']['calls_per_token']:.3f}, "
          f"confidence:0.5 {out['confidence:0.5']['calls_per_token']:.3f} (x{ratio:.3f})")
    record("confidence_forwards", {"policies": out, "ratio": ratio,
                                   "sentences": len(sources)}, **info)
    assert all(v["target_tokens_fed"] > 0 for v in out.values())
