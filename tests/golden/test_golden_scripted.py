"""Policy-level golden traces: a scripted model, no floating-point decisions.

``script_lm`` builds a ``simulref.testing.successor_model``: a real ``mlx.nn.Module`` that
speaks mlx-lm's KV-cache protocol (so the decoder drives it through a StreamCache exactly
as it drives a real model) and whose logits are one-hot: after the assistant header it
says the first token of a fixed script, after each script token the next one, and EOS
after the last one (or it starts the script again, for a model that never stops).
Whatever the source, the same target tokens come out, so these snapshots pin the
decoder's schedule (wait-k over every small k x N), word boundaries, dropped EOS, blank
runs, and the max_tokens_per_word / max_new_words limits, independently of any model's
numerics. The layout and the engine cannot matter to such a model: every case is also
run with the prefilled engine and in the interleaved and reencode layouts and must give
the same events.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from goldens import assert_valid, records

from simulref.decoder import translate
from simulref.policy import Confidence, LocalAgreement, Scripted
from simulref.prompt import DEFAULT_SYSTEM, template_for
from simulref.testing import successor_model, tiny_tokenizer
from simulref.trace import BlankRun, DroppedEos, Read

POOL = "The weather is nice today so we are going to walk in the park".split()


def tokenizer():
    return tiny_tokenizer()


def header_last() -> int:
    return template_for(tokenizer(), system=DEFAULT_SYSTEM).header_ids[-1]


def eos() -> int:
    (token,) = tokenizer().eos_token_ids
    return token


def script_lm(vocab_size: int, script: list[int], *, start: int, end: int,
              loop: bool = False):
    """next token = successor[last token fed]: the assistant header's last token leads to
    ``script[0]``, each script token to the next, the last one to EOS (``loop=False``) or
    back to ``script[0]`` (``loop=True``), and every other token to EOS. Script tokens
    must be distinct (a token has one successor)."""
    if len(set(script)) != len(script) or start in script or end in script:
        raise ValueError(f"script: expected distinct tokens other than start={start} "
                         f"and end={end}, got {script}")
    chain = [start, *script]
    successors = dict(zip(chain, chain[1:], strict=False))
    if script:
        successors[script[-1]] = script[0] if loop else end
    return successor_model(vocab_size, successors, default=end)


def script_of(text: str) -> list[int]:
    return tokenizer().encode(text, add_special_tokens=False)


# 7 words, 15 distinct tokens: " Le", " ren|ard", " br|un", " sau|te", " par|-|dess|us",
# " le", " c|hi|en".
FOX = " Le renard brun saute par-dessus le chien"
# " Il" is a whitespace-only token then "Il": whitespace joins the next word.
BEAU = " Il fait beau"


# Four single-character whitespace tokens: \t \v \f \r.
WHITESPACE = (200, 202, 203, 204)


@dataclass(frozen=True)
class Case:
    name: str
    script: tuple[int, ...]
    n: int  # source words, from POOL
    k: int | None = None
    policy: Scripted | None = None
    loop: bool = False
    max_tokens_per_word: int = 50
    max_new_words: int | None = None
    stop_at_first_eos: bool = False

    def run(self, layout: str = "group", engine: str = "incremental"):
        model = script_lm(len(tokenizer()), list(self.script), start=header_last(),
                          end=eos(), loop=self.loop)
        return translate(model, tokenizer(), POOL[:self.n], k=self.k or 3, policy=self.policy,
                         layout=layout, max_tokens_per_word=self.max_tokens_per_word,
                         max_new_words=self.max_new_words,
                         stop_at_first_eos=self.stop_at_first_eos, model_id="script",
                         engine=engine if layout == "group" else "auto")


GRID = [Case(f"k{k}-n{n}", tuple(script_of(FOX)), n=n, k=k)
        for k in (1, 2, 3, 5) for n in (1, 3, 6, 9)]

NAMED = [
    # EOS as the very first target token: dropped after each read until the source ends.
    Case("eos-after-header", (), n=4, k=2),
    # Two words, then EOS while 4 source words are unread: dropped EOS, forced reads.
    Case("dropped-eos", tuple(script_of(" Le renard")), n=6, k=1),
    Case("stop-at-first-eos", tuple(script_of(" Le renard")), n=6, k=1,
         stop_at_first_eos=True),
    Case("whitespace-joins-next-word", tuple(script_of(BEAU)), n=4, k=2),
    # Words of up to 4 tokens cut at 2 while the source is still being read ...
    Case("cut-words-mid-source", tuple(script_of(FOX)), n=9, k=2, max_tokens_per_word=2),
    # ... and a cut once the source is done ends the translation.
    Case("cut-word-ends-it", tuple(script_of(FOX)), n=2, k=1, max_tokens_per_word=2),
    # Four whitespace-only tokens cut at 2: a blank run, and the decoder reads on.
    Case("blank-run-reads-on", (*WHITESPACE, *script_of(" Le renard")), n=4, k=1,
         max_tokens_per_word=2),
    Case("max-new-words", tuple(script_of(FOX)), n=5, k=1, max_new_words=3),
    # A model that never says EOS: the runaway guard stops it at 2 * N + 10 words.
    Case("runaway-guard", tuple(script_of(" Le renard")), n=2, k=1, loop=True),
    Case("scripted-policy", tuple(script_of(FOX)), n=6, policy=Scripted((2, 2, 4))),
]


def events_only(trace) -> list[dict]:
    return records(trace)[1:]


@pytest.mark.parametrize("case", GRID + NAMED, ids=lambda c: c.name)
def test_scripted_trace(case, snapshot_json):
    trace = case.run()
    assert_valid(trace, k=case.k)
    for layout, engine in (("group", "prefilled"), ("interleaved", "auto"), ("reencode", "auto")):
        assert events_only(case.run(layout, engine)) == events_only(trace), (layout, engine)
    assert records(case.run("group", "prefilled")) == records(trace)
    assert records(trace) == snapshot_json


def test_the_grid_covers_dropped_eos_and_every_finish_the_script_allows():
    reasons = {case.name: case.run().finish_reason for case in GRID + NAMED}
    assert set(reasons.values()) == {"eos", "early_eos", "max_new_words",
                                     "max_tokens_per_word"}
    dropped = [c.name for c in GRID if any(isinstance(e, DroppedEos) for e in c.run().events)]
    assert "k1-n9" in dropped  # 7 target words cannot cover 9 source words at k=1


def test_a_blank_run_is_recorded_and_justifies_the_read_after_it():
    case = next(c for c in NAMED if c.name == "blank-run-reads-on")
    events = case.run().events
    runs = [(j, e) for j, e in enumerate(events) if isinstance(e, BlankRun)]
    assert [e.token_ids for _, e in runs] == [WHITESPACE[:2], WHITESPACE[2:]]
    assert [e.source_index for _, e in runs] == [0, 1]
    assert all(isinstance(events[j + 1], Read) for j, _ in runs)



# ---------------------------------------------------------------- observing policies

# The scripted model is certain (probability 1.0 in float32), so Confidence writes as soon
# as k_min words are read, whatever the threshold below 1; LocalAgreement's hypotheses
# agree from the second one on. What these pin: the look and hypothesis records, the
# commit schedule, dropped EOS and word limits under both policies. Every case also runs
# with the other engine (prefilled for Confidence, the twin for LocalAgreement): the same
# events.
POLICY_CASES = [
    Case("confidence-k1", tuple(script_of(FOX)), n=6, policy=Confidence(0.6)),
    Case("confidence-kmin3", tuple(script_of(FOX)), n=6, policy=Confidence(0.6, k_min=3)),
    Case("confidence-dropped-eos", tuple(script_of(" Le renard")), n=5,
         policy=Confidence(0.6)),
    Case("confidence-cut-words", tuple(script_of(FOX)), n=4, policy=Confidence(0.6),
         max_tokens_per_word=2),
    Case("agreement-2", tuple(script_of(FOX)), n=6, policy=LocalAgreement(2)),
    Case("agreement-1", tuple(script_of(FOX)), n=4, policy=LocalAgreement(1)),
    Case("agreement-3-chunk2", tuple(script_of(FOX)), n=7, policy=LocalAgreement(3, 2)),
    Case("agreement-eos-after-header", (), n=3, policy=LocalAgreement(2)),
    Case("agreement-max-new-words", tuple(script_of(FOX)), n=6, policy=LocalAgreement(2),
         max_new_words=3),
    Case("agreement-runaway-guard", tuple(script_of(" Le renard")), n=2,
         policy=LocalAgreement(2), loop=True),
    Case("agreement-cut-words", tuple(script_of(FOX)), n=3, policy=LocalAgreement(2),
         max_tokens_per_word=2),
]


@pytest.mark.parametrize("case", POLICY_CASES, ids=lambda c: c.name)
def test_scripted_policy_trace(case, snapshot_json):
    twin = case.run("group", "incremental")
    assert_valid(twin, k=None)
    other = "prefilled" if isinstance(case.policy, Confidence) else "auto"
    fast = case.run("group", other)
    assert events_only(fast) == events_only(twin), other
    assert records(twin) == snapshot_json
