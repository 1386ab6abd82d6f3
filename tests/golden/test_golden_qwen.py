"""Golden read/write traces of the default preset, qwen2.5-coder-0.5b (greedy, float32).

A few group-layout cases only, and one sentence per observing policy: this model costs
about four times smollm2-135m per token.
Update on purpose with ``pytest tests/golden --snapshot-update`` (see docs/golden.md).
"""

from __future__ import annotations

import pytest
from goldens import PolicyCase, RealCase, check_policy_case, check_real

CASES = [RealCase("fox", 3), RealCase("fox", 5), RealCase("short", 3)]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=str)
def test_qwen_coder_trace(case, qwen_coder, snapshot_json):
    model, tokenizer = qwen_coder
    gap = check_real(model, tokenizer, case, "qwen2.5-coder-0.5b", snapshot_json)
    print(f"min_logit_gap qwen2.5-coder-0.5b {case} {gap}")  # shown with -s or -rP


# Observing policies on the default model: one sentence each (the twin, then the fast
# engine against it, as for smollm2-135m).
POLICY_CASES = [PolicyCase("short", "confidence:0.7"), PolicyCase("short", "local-agreement:2")]


@pytest.mark.slow
@pytest.mark.parametrize("case", POLICY_CASES, ids=str)
def test_qwen_coder_policy_trace(case, qwen_coder, snapshot_json):
    model, tokenizer = qwen_coder
    check_policy_case(model, tokenizer, case, "qwen2.5-coder-0.5b", snapshot_json)
