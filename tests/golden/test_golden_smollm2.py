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
from goldens import SENTENCES, RealCase, check_real

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
