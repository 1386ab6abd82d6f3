"""Every snapshot file belongs to a current golden case.

syrupy 7 reports and deletes snapshots of removed cases only when pytest is run without a
path (checked: `pytest tests/golden --snapshot-update` leaves them); this catches them.
"""

from __future__ import annotations

from pathlib import Path

import test_golden_qwen as qwen
import test_golden_scripted as scripted
import test_golden_smollm2 as smollm2

SNAPSHOTS = Path(__file__).parent / "__snapshots__"


def expected_files() -> set[str]:
    return {
        *(f"test_golden_scripted/test_scripted_trace[{c.name}].json"
          for c in scripted.GRID + scripted.NAMED),
        *(f"test_golden_scripted/test_scripted_policy_trace[{c.name}].json"
          for c in scripted.POLICY_CASES),
        *(f"test_golden_smollm2/test_smollm2_trace[{c}].json" for c in smollm2.cases()),
        *(f"test_golden_smollm2/test_smollm2_policy_trace[{c}].json"
          for c in smollm2.POLICY_CASES),
        *(f"test_golden_qwen/test_qwen_coder_trace[{c}].json" for c in qwen.CASES),
        *(f"test_golden_qwen/test_qwen_coder_policy_trace[{c}].json"
          for c in qwen.POLICY_CASES),
    }


def test_no_stale_snapshot_files():
    have = {p.relative_to(SNAPSHOTS).as_posix() for p in SNAPSHOTS.glob("*/*.json")}
    stale = sorted(have - expected_files())
    assert stale == [], f"snapshots of cases that no longer exist, delete them: {stale}"
