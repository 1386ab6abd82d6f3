"""Golden read/write traces of the smollm2-135m preset (greedy, float32).

Each case is a sentence x wait-k lag x cache layout; the snapshot holds the trace without
times (words, token ids, delays, finish reason). The fox sentence gets k in {1, 3, 5, 1000}
in both layouts; the long one k in {1, 3, 5, 1000} and the others k in {1, 3, 1000}, in
the group layout, keeping k < N or k = 1000. Lags k >= N other than 1000 are left out: they
read the whole source first, as k = 1000 does (same schedule, and the same trace, measured),
and the scripted goldens cover the schedule over every small k x N.
CPU time is the budget (docs/golden.md): each case costs seconds on a 2-core CPU.

Update on purpose with ``pytest tests/golden --snapshot-update`` (see docs/golden.md).
"""

from __future__ import annotations

import pytest
from goldens import SENTENCES, PolicyCase, RealCase, check_policy_case, check_real

LAGS = (1, 3, 5, 1000)


def cases() -> list[RealCase]:
    out = [RealCase("fox", k, layout) for layout in ("group", "interleaved") for k in LAGS]
    for name, sentence in SENTENCES.items():
        if name == "fox":
            continue
        n = len(sentence.split())
        lags = LAGS if name == "long" else (1, 3, 1000)
        out += [RealCase(name, k) for k in lags if k < n or k == 1000]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", cases(), ids=str)
def test_smollm2_trace(case, smollm2, snapshot_json):
    model, tokenizer = smollm2
    gap = check_real(model, tokenizer, case, "smollm2-135m", snapshot_json)
    print(f"min_logit_gap smollm2-135m {case} {gap}")  # shown with -s or -rP


@pytest.mark.slow
def test_smollm2_goldens_in_one_batch(smollm2):
    """Every case above in one batch of 8 rows (their k and layouts mixed, refills,
    rows that finish early): each trace equals its case's snapshot file (the trace the
    incremental twin makes, checked above, with its near-tie guard)."""
    import json
    from pathlib import Path

    from goldens import MAX_NEW_WORDS, MAX_TOKENS_PER_WORD, records

    from simulref.batch import Finished, Item, decode_items
    from simulref.config import DecodeConfig

    model, tokenizer = smollm2
    stored = Path(__file__).parent / "__snapshots__" / "test_golden_smollm2"
    items = [Item(str(case), SENTENCES[case.sentence],
                  DecodeConfig(k=case.k, layout=case.layout, max_new_words=MAX_NEW_WORDS,
                               max_tokens_per_word=MAX_TOKENS_PER_WORD)) for case in cases()]
    done = {f.key: f.trace for f in decode_items(model, tokenizer, items, batch_size=8,
                                                 model_id="smollm2-135m")
            if isinstance(f, Finished)}
    for case in cases():
        expected = json.loads((stored / f"test_smollm2_trace[{case}].json").read_text())
        assert done[str(case)].settings.option("engine") == "batched"
        assert records(done[str(case)]) == expected, f"{case}: batched != snapshot"


# Observing policies: Confidence at two thresholds and LocalAgreement-2, on two sentences.
POLICY_CASES = [PolicyCase(sentence, policy) for sentence in ("short", "fox")
                for policy in ("confidence:0.5", "confidence:0.8", "local-agreement:2")]


@pytest.mark.slow
@pytest.mark.parametrize("case", POLICY_CASES, ids=str)
def test_smollm2_policy_trace(case, smollm2, snapshot_json):
    model, tokenizer = smollm2
    check_policy_case(model, tokenizer, case, "smollm2-135m", snapshot_json)
