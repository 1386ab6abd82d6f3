"""Helpers for the golden traces: what a snapshot holds, the checks every golden passes,
and the sentences and settings of the real-model goldens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from simulref.decoder import translate
from simulref.trace import Trace
from simulref.verify import check_trace


def records(trace: Trace) -> list[dict]:
    """The snapshot of a trace: its JSON Lines records without times (header first:
    settings, source and target words, delays, finish reason; then one per event with
    words and token ids)."""
    out = [json.loads(line) for line in trace.to_jsonl(times=False).splitlines()]
    # Every engine gives the same trace: which one ran is not part of the golden.
    out[0].get("settings", {}).get("extra", {}).pop("engine", None)
    for record in out:
        if record.get("record") == "look":
            # Engines (and BLAS builds) differ in float rounding: a look's probability is
            # pinned to 3 decimals (the decision is pinned by the next record).
            record["probs"] = [round(p, PROB_DECIMALS) for p in record["probs"]]
    return out


PROB_DECIMALS = 3


def assert_valid(trace: Trace, k: int | None) -> None:
    """The trace passes simulref.verify (consistent events and, with k, wait-k)."""
    violations = check_trace(trace, k=k)
    assert violations == [], "\n".join(str(v) for v in violations)


# ---------------------------------------------------------------- real models


def _postgres_sentence() -> str:
    first = resources.files("simulref").joinpath("data/postgres-en-fr.tsv").read_text(
        encoding="utf-8").splitlines()[0]
    return first.split("\t")[0]


SENTENCES = {
    "short": "The weather is nice today.",
    "long": ("When the committee finally met on Tuesday afternoon, nobody could remember "
             "who had booked the room, so they argued for an hour before anyone opened "
             "the agenda."),
    "punct": 'Wait -- really? Yes: (she said) "no!"; then, well... fine.',
    "numbers": "In 2023, 42 people paid $3.50 each for 7 tickets.",
    "one": "Welcome!",
    "empty": "   ",
    "fox": "The quick brown fox jumps over the lazy dog.",
    "postgres": _postgres_sentence(),  # "Sets the message levels that are sent to the client."
}

# Bounds on the work per case (CPU time is the budget): the smaller models ramble on after
# the source ends, up to 2 * N + 10 words of up to 50 tokens by default.
MAX_NEW_WORDS = 6
MAX_TOKENS_PER_WORD = 8
# Smallest top-1/top-2 logit gap allowed at any target step. Switching BLAS (reference vs
# OpenBLAS) moves these logits by <= 6e-5 (measured); a case closer to a tie than this
# would flip on another machine, so it does not make a golden.
MIN_GAP = 1e-3
DTYPE = "float32"  # not the device default: on a GPU that is "quantized", another model


@dataclass(frozen=True)
class RealCase:
    sentence: str  # a key of SENTENCES
    k: int
    layout: str = "group"

    def __str__(self) -> str:
        return f"{self.sentence}-k{self.k}-{self.layout}"


def run_real(model, tokenizer, case: RealCase, model_id: str, engine: str = "incremental"
             ) -> tuple[Trace, float | None]:
    """Translate ``case`` greedily; return the trace and the smallest top-1/top-2 logit
    gap over every target step (None when no target token was predicted)."""
    import mlx.core as mx

    gaps = []

    def watch(forward):
        if forward.logits is not None:
            # lazy: no extra sync on the decode path; every row of a multi-row forward
            top2 = mx.topk(forward.logits, 2, axis=-1)
            gaps.append(mx.min(mx.abs(top2[..., 1] - top2[..., 0])))

    trace = translate(model, tokenizer, SENTENCES[case.sentence], k=case.k,
                      layout=case.layout, max_new_words=MAX_NEW_WORDS,
                      max_tokens_per_word=MAX_TOKENS_PER_WORD, model_id=model_id,
                      engine=engine, on_forward=watch)
    if not gaps:
        return trace, None
    return trace, min(mx.stack(gaps).tolist())


def check_real(model, tokenizer, case: RealCase, model_id: str, snapshot) -> float | None:
    """Run ``case`` with the incremental engine (the twin): a valid trace, no near tie,
    equal to the snapshot; then with the prefilled engine (group layout): the same trace.
    Returns the smallest logit gap seen. (The prefilled engine's second row is checked
    for ties too, also where it goes unused: a stricter guard.)"""
    trace, gap = run_real(model, tokenizer, case, model_id, "incremental")
    assert_valid(trace, k=case.k)
    _check_gap(case, gap)
    assert records(trace) == snapshot
    if case.layout == "group":
        fast, fast_gap = run_real(model, tokenizer, case, model_id, "prefilled")
        assert fast.settings.option("engine") == "prefilled"
        _check_gap(case, fast_gap)
        assert records(fast) == records(trace), f"{case}: prefilled != incremental"
        gap = None if gap is None else min(gap, fast_gap)
    return gap


def _check_gap(case: RealCase, gap: float | None) -> None:
    assert gap is None or gap >= MIN_GAP, (
        f"{case}: top-1/top-2 logit gap {gap:.2e} < {MIN_GAP:g}: a near tie that another "
        "BLAS or device may break; pick another case")


# ---------------------------------------------------------------- observing policies


@dataclass(frozen=True)
class PolicyCase:
    sentence: str  # a key of SENTENCES
    policy: str  # simulref.policy.parse_policy syntax

    def __str__(self) -> str:
        return f"{self.sentence}-{self.policy.replace(':', '-')}"


def run_policy(model, tokenizer, case: PolicyCase, model_id: str, engine: str
               ) -> tuple[Trace, float | None]:
    """:func:`run_real` for an observing policy; the smallest logit gap as there."""
    import mlx.core as mx

    from simulref.policy import parse_policy

    gaps = []

    def watch(forward):
        if forward.logits is not None:
            top2 = mx.topk(forward.logits, 2, axis=-1)
            gaps.append(mx.min(mx.abs(top2[..., 1] - top2[..., 0])))

    trace = translate(model, tokenizer, SENTENCES[case.sentence],
                      policy=parse_policy(case.policy), max_new_words=MAX_NEW_WORDS,
                      max_tokens_per_word=MAX_TOKENS_PER_WORD, model_id=model_id,
                      engine=engine, on_forward=watch)
    return trace, (min(mx.stack(gaps).tolist()) if gaps else None)


def check_policy_case(model, tokenizer, case: PolicyCase, model_id: str, snapshot) -> None:
    """The twin (incremental) against the snapshot, with the near-tie guard and, for
    Confidence, no look within 10^-PROB_DECIMALS of the threshold; then the fast engine
    (prefilled for Confidence, the draft path for LocalAgreement): the same records."""
    from simulref.policy import Confidence, parse_policy
    from simulref.trace import Look

    policy = parse_policy(case.policy)
    twin, gap = run_policy(model, tokenizer, case, model_id, "incremental")
    assert_valid(twin, k=None)
    _check_gap(case, gap)
    if isinstance(policy, Confidence):
        near = [e.probs[0] for e in twin.events if isinstance(e, Look)
                and abs(e.probs[0] - policy.threshold) < 10 ** -PROB_DECIMALS]
        assert not near, f"{case}: looks within rounding of the threshold: {near}"
    assert records(twin) == snapshot
    fast_engine = "prefilled" if isinstance(policy, Confidence) else "auto"
    fast, _ = run_policy(model, tokenizer, case, model_id, fast_engine)
    assert records(fast) == records(twin), f"{case}: {fast_engine} != incremental"
