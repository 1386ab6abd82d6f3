"""docs/policies.md's example of a user's own observing policy runs as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "policies.md"


def example_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "docs/policies.md: expected one python example"
    return blocks[0]


def test_the_example_runs_as_written(capsys, monkeypatch):
    # A module of its own, as a script would be (dataclasses look their module up).
    module = types.ModuleType("policies_doc")
    monkeypatch.setitem(sys.modules, "policies_doc", module)
    namespace = module.__dict__
    exec(compile(example_code(), str(DOC), "exec"), namespace)
    trace = namespace["trace"]
    printed = capsys.readouterr().out.strip()
    assert printed == str(trace.delays)
    looks = [e for e in trace.events if type(e).__name__ == "Look"]
    assert looks, "the example policy never looked at the model"
    # Its rule holds: never more than max_lag words behind, and a write before the
    # source ended was either sure or lagging.
    policy = namespace["SureOrLagging"](0.6)
    for i, delay in enumerate(trace.delays):
        assert delay - i <= policy.max_lag or delay == len(trace.source_words)


def test_the_example_is_about_twenty_lines():
    code = example_code()
    start = code.index("@dataclass")
    end = code.index("trace = translate")
    lines = [line for line in code[start:end].splitlines() if line.strip()]
    assert len(lines) <= 22, len(lines)
