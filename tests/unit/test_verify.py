"""verify.py: prompt, schedule and trace checks; trace comparison; the verify command."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from simulref.cli.verify import add_verify_parser, run_verify_cli
from simulref.policy import READ, Scripted, WaitK, schedule
from simulref.prompt import DEFAULT_SYSTEM, ChatFormat, assemble
from simulref.testing import tiny_tokenizer
from simulref.trace import (
    BlankRun,
    DroppedEos,
    Finish,
    Read,
    Settings,
    SourceEnd,
    Trace,
    Write,
    read_traces,
)
from simulref.verify import (
    Bound,
    Divergence,
    Violation,
    check_header,
    check_prompt,
    check_schedule,
    check_trace,
    compare_traces,
    load_traces,
)

ROOT = Path(__file__).resolve().parents[2]
PROPERTY = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
CHATML = ChatFormat(prefix="<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n",
                    suffix="<|im_end|>\n", header="<|im_start|>assistant\n")


def rules(violations) -> set[str]:
    return {v.rule for v in violations}


def test_verify_module_does_not_import_mlx():
    code = "import sys, simulref.verify; print(sorted(m for m in sys.modules if 'mlx' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ prompts

words_st = st.lists(st.text(st.characters(categories=("L", "N", "P")), min_size=1, max_size=6),
                    min_size=1, max_size=6)
system_st = st.text(st.characters(categories=("L", "N", "P", "Zs")), min_size=1,
                    max_size=30).map(str.strip).filter(bool)


def test_prompt_from_assemble_passes_with_wrapper_and_hf_tokenizer(tiny_tok):
    prompt = assemble(tiny_tok, "The quick brown fox a", system=DEFAULT_SYSTEM)
    for tokenizer in (tiny_tok, tiny_tok._tokenizer):
        assert check_prompt(prompt.ids, prompt.spans, tokenizer, DEFAULT_SYSTEM,
                            prompt.words) == []


@PROPERTY
@given(words=words_st, system=system_st)
def test_assembled_prompts_pass_and_a_moved_instruction_token_is_caught(tiny_tok, words,
                                                                        system):
    prompt = assemble(tiny_tok, words, system=system)
    assert check_prompt(prompt.ids, prompt.spans, tiny_tok, system, words) == []
    # The last token of segment 0 moved into word 1: the instruction leaks into a word.
    spans = list(prompt.spans)
    spans[0] = (0, spans[0][1] - 1)
    spans[1] = (spans[1][0] - 1, spans[1][1])
    found = check_prompt(prompt.ids, spans, tiny_tok, system, words)
    assert [(v.rule, v.span, v.source_index) for v in found] == [("prompt.word", 1, 0)]
    assert found[0].expected == words[0]


def test_a_split_instruction_is_caught(tiny_tok):
    prompt = assemble(tiny_tok, "The fox", system=DEFAULT_SYSTEM)
    # Cut segment 0 inside the instruction: its tail lands in word 1.
    cut = len(tiny_tok.encode("<|im_start|>system\nTranslate the following",
                              add_special_tokens=False))
    spans = [(0, cut), (cut, prompt.spans[1][1]), *prompt.spans[2:]]
    found = check_prompt(prompt.ids, spans, tiny_tok, DEFAULT_SYSTEM, prompt.words)
    assert rules(found) == {"prompt.instruction", "prompt.word"}
    assert "prompt.instruction: span 0:" in str(found[0])


@pytest.mark.parametrize("change, expected", [
    (lambda s: s[:-1], "expected 5, got 4"),  # a missing span
    (lambda s: [s[0], (s[1][0] + 1, s[1][1]), *s[2:]], "a gap"),
    (lambda s: [s[0], (s[1][0] - 1, s[1][1]), *s[2:]], "overlaps"),
    (lambda s: [*s[:-1], (s[-1][0], s[-1][1] - 1)], "end where the ids end"),
])
def test_spans_that_do_not_tile_the_ids_are_caught(tiny_tok, change, expected):
    prompt = assemble(tiny_tok, "The quick fox", system=DEFAULT_SYSTEM)
    found = check_prompt(prompt.ids, change(list(prompt.spans)), tiny_tok, DEFAULT_SYSTEM,
                         prompt.words)
    assert rules(found) == {"prompt.spans"}
    assert any(expected in str(v) for v in found), [str(v) for v in found]


def test_a_wrong_suffix_is_caught_against_the_discovered_template(tiny_tok):
    prompt = assemble(tiny_tok, "The fox", system=DEFAULT_SYSTEM)
    extra = tuple(tiny_tok.encode(" fox", add_special_tokens=False))
    ids = prompt.ids + extra
    spans = [*prompt.spans[:-1], (prompt.spans[-1][0], len(ids))]
    found = check_prompt(ids, spans, tiny_tok, DEFAULT_SYSTEM, prompt.words)
    assert [(v.rule, v.span) for v in found] == [("prompt.suffix", 3)]
    assert found[0].expected == list(prompt.template.suffix_ids)


class PlainTokenizer:
    """encode/decode only: no chat template to discover."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text, add_special_tokens=False):
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids):
        return self.tok.decode(ids)


def test_without_a_template_the_suffix_must_hold_no_source_word(tiny_tok):
    plain = PlainTokenizer(tiny_tok)
    words = ("a", "im_end", "fox")  # "a" and "im_end" occur inside "<|im_end|>"
    prompt = assemble(plain, words, system=DEFAULT_SYSTEM, chat_format=CHATML)
    assert check_prompt(prompt.ids, prompt.spans, plain, DEFAULT_SYSTEM, words) == []
    leaked = tuple(tiny_tok.encode("<|im_end|>\n fox", add_special_tokens=False))
    ids = prompt.ids[:prompt.spans[-1][0]] + leaked
    spans = [*prompt.spans[:-1], (prompt.spans[-1][0], len(ids))]
    found = check_prompt(ids, spans, plain, DEFAULT_SYSTEM, words)
    assert [(v.rule, v.span) for v in found] == [("prompt.suffix", 4)]
    assert "['fox']" in found[0].message
    # With the format given, the ids rule applies instead.
    found = check_prompt(ids, spans, plain, DEFAULT_SYSTEM, words, chat_format=CHATML)
    assert found[0].expected == list(prompt.template.suffix_ids)


class StripFirstSpace(PlainTokenizer):
    """Decodes like a SentencePiece tokenizer: the first leading space is dropped."""

    def decode(self, ids, **options):
        text = self.tok.decode(ids, **options)
        return text[1:] if text.startswith(" ") else text


def test_tokenizers_that_drop_a_leading_space_on_decode_are_judged_fairly(tiny_tok):
    spm_like = StripFirstSpace(tiny_tok)
    prompt = assemble(spm_like, "The quick fox", system=DEFAULT_SYSTEM, chat_format=CHATML)
    assert spm_like.decode(list(prompt.segments[2])) == "quick"  # a lone-segment decode lies
    assert check_prompt(prompt.ids, prompt.spans, spm_like, DEFAULT_SYSTEM, prompt.words,
                        chat_format=CHATML) == []


@pytest.mark.parametrize("args, error", [
    (dict(ids="abc"), TypeError),
    (dict(ids=[1, "2"]), TypeError),
    (dict(spans=[(0, 1, 2)]), TypeError),
    (dict(system=""), TypeError),
    (dict(words=[1]), TypeError),
    (dict(tokenizer=object()), TypeError),
])
def test_check_prompt_rejects_bad_arguments(tiny_tok, args, error):
    call = dict(ids=[1, 2], spans=[(0, 1), (1, 2), (2, 2)], tokenizer=tiny_tok, system="S",
                words=["x"])
    call.update(args)
    with pytest.raises(error, match=next(iter(args))):
        check_prompt(**call)


# ---------------------------------------------------------------- schedules


@given(n=st.integers(0, 12), k=st.integers(1, 8), targets=st.integers(0, 20))
def test_wait_k_schedules_from_the_policy_pass(n, k, targets):
    assume(n > 0 or targets == 0)
    assert check_schedule(schedule(WaitK(k), n, targets), n, k) == []


@given(n=st.integers(1, 12), k=st.integers(1, 8), targets=st.integers(1, 20), data=st.data())
def test_one_changed_delay_is_reported_at_its_index(n, k, targets, data):
    delays = list(schedule(WaitK(k), n, targets))
    i = data.draw(st.integers(0, targets - 1))
    change = data.draw(st.integers(-3, 3).filter(bool))
    delays[i] += change
    found = check_schedule(delays, n, k)
    assert [(v.rule, v.target_index, v.expected, v.actual) for v in found] == [
        ("schedule.wait_k", i, min(k + i, n), min(k + i, n) + change)]


def test_check_schedule_rejects_bad_arguments():
    with pytest.raises(TypeError, match="delays"):
        check_schedule("123", 3, 1)
    with pytest.raises(ValueError, match="source_length"):
        check_schedule([1], -1, 1)
    with pytest.raises(ValueError, match="k"):
        check_schedule([1], 3, 0)


# ------------------------------------------------------------------- traces


def simulate(words, k, n_targets, *, eos_at=(), worded=(), blank_at=(), max_new_words=None,
             stop_at_first_eos=False, truncate=False) -> Trace:
    """The events a wait-k decoder emits for a model that writes ``n_targets`` words, then
    EOS, and also samples EOS at the write attempts numbered in ``eos_at`` (right after a
    word, in the same attempt, for those also in ``worded``) and only whitespace, up to
    the 2-token word limit, at those in ``blank_at``. A plain restatement of the
    decoder's loop (simulref.loop._Run.events), without a model."""
    n, policy, events = len(words), WaitK(k), []
    read = written = attempts = 0
    force = False
    while True:
        if max_new_words is not None and written >= max_new_words:
            events.append(Finish("max_new_words"))
            break
        done = read == n
        if not done and (force or policy.decide(read, written, False, n) is READ):
            events.append(Read(read, words[read], (100 + read,)))
            read, force = read + 1, False
            continue
        attempt, attempts = attempts, attempts + 1
        if attempt in blank_at and attempt not in eos_at:
            if done:  # a word cut by the token limit once the source ended
                events.append(Finish("max_tokens_per_word"))
                break
            events.append(BlankRun(read - 1, (9, 9)))
            force = True
            continue
        if written < n_targets and (attempt not in eos_at or attempt in worded):
            events.append(Write(written, f" t{written}", (200 + written, 7)))
            written += 1
            if attempt not in eos_at:
                continue
        if done:  # EOS once the source ended
            events.append(Finish("eos"))
            break
        if stop_at_first_eos:
            events.append(Finish("early_eos"))
            break
        events.append(DroppedEos(read - 1))
        force = True
    source = tuple(e.word for e in events if isinstance(e, Read)) if truncate else tuple(words)
    events = [dataclasses.replace(e, t=0.1 * j) for j, e in enumerate(events)]  # a clock
    return Trace(Settings(model="sim", k=k, layout="group", system="S",
                          max_tokens_per_word=2, max_new_words=max_new_words,
                          stop_at_first_eos=stop_at_first_eos),
                 source, tuple(events))


@st.composite
def valid_traces(draw):
    n = draw(st.integers(1, 7))
    words = [f"w{i}" for i in range(n)]
    n_targets = draw(st.integers(0, n + 4))
    return simulate(
        words, draw(st.integers(1, 5)), n_targets,
        eos_at=draw(st.frozensets(st.integers(0, 12), max_size=3)),
        worded=draw(st.frozensets(st.integers(0, 12), max_size=6)),
        blank_at=draw(st.frozensets(st.integers(0, 12), max_size=2)),
        max_new_words=draw(st.none() | st.integers(0, n_targets + 1)),
        stop_at_first_eos=draw(st.booleans()), truncate=draw(st.booleans()))


def hand(events, source=("The", "quick", "brown", "fox"), k=2, **options) -> Trace:
    return Trace(Settings(model="hand", k=k, layout="group", system="S", **options),
                 tuple(source), tuple(events))


def R(i, word=None):
    return Read(i, word or ("The", "quick", "brown", "fox")[i], (10 + i,))


def W(i, text=None):
    return Write(i, text or f" m{i}", (50 + i,))


def B(i, n=50):
    """A blank run of ``n`` tokens (hand()'s max_tokens_per_word is the default, 50)."""
    return BlankRun(i, (9,) * n)


# wait-2 over 4 words, 4 target words: delays 2, 3, 4, 4.
GOOD = [R(0), R(1), W(0), R(2), W(1), R(3), W(2), W(3), Finish("eos")]


def test_a_hand_made_wait_k_trace_passes_with_and_without_k():
    trace = hand(GOOD)
    assert trace.delays == (2, 3, 4, 4)
    assert check_trace(trace) == []
    assert check_trace(trace, k=2) == []
    assert check_trace(dataclasses.replace(trace, settings=Settings(
        model="x", k=None, layout="group", system="S"))) == []


def test_a_write_one_read_too_early_is_caught():
    events = [R(0), R(1), W(0), W(1), R(2), R(3), W(2), W(3), Finish("eos")]
    found = check_trace(hand(events))
    assert [(v.rule, v.event_index, v.target_index) for v in found] == [
        ("trace.early_write", 3, 1)]
    early = found[0]
    assert (early.expected, early.actual) == (Bound(">=", 3), 2)
    assert str(early).startswith("trace.early_write: event 3, target 1: ")
    assert str(early).endswith("(expected >= 3, got 2)")
    assert check_schedule(hand(events).delays, 4, 2)[0].target_index == 1


# The same trace from a live source: the suffix read alone once the stream ended.
END = SourceEnd(4, (90, 91))
LIVE = [R(0), R(1), W(0), R(2), W(1), R(3), W(2), END, W(3), Finish("eos")]


def test_a_live_source_end_passes_where_the_decoder_puts_it():
    assert check_trace(hand(LIVE)) == []
    # wait-2 wants 2 + 3 = 5 words before target word 3: it tries to read and finds the end
    assert check_trace(hand([*GOOD[:7], END, W(3), Finish("eos")])) == []
    # a dropped EOS forces the attempt too
    eos = [R(0), R(1), W(0), R(2), W(1), R(3), W(2), W(3), DroppedEos(3), END,
           Finish("eos")]
    assert check_trace(hand(eos)) == []


@pytest.mark.parametrize("events, where", [
    ([R(0), R(1), W(0), R(2), END, W(1), W(2), Finish("eos")], 4),  # before the last word
    ([*LIVE[:7], SourceEnd(3, (90,)), W(3), Finish("eos")], 7),  # wrong count
    ([*LIVE[:8], END, W(3), Finish("eos")], 8),  # twice
    ([R(0), R(1), W(0), R(2), W(1), END, R(3), W(2), W(3), Finish("eos")], 5),
    ([*LIVE[:9], DroppedEos(3), Finish("eos")], 9),  # EOS dropped after the end
])
def test_a_misplaced_source_end_is_caught(events, where):
    found = check_trace(hand(events))
    assert found and min(v.event_index for v in found) <= where + 1, found
    assert rules(found) & {"trace.source_end", "trace.dropped_eos"}


def test_a_source_end_wait_k_did_not_ask_for_is_caught():
    # wait-3 over 4 words: after target word 1 it wants 3 + 2 = 5 words, so it tries to
    # read and finds the end; right after the 4th word it wants only 4 and writes.
    asked = [R(0), R(1), R(2), W(0), R(3), W(1), END, W(2), Finish("eos")]
    assert check_trace(hand(asked, k=3)) == []
    for unasked in ([R(0), R(1), R(2), W(0), R(3), END, W(1), W(2), Finish("eos")],
                    [R(0), R(1), R(2), R(3), END, W(0), Finish("eos")]):
        assert rules(check_trace(hand(unasked, k=3))) >= {"trace.extra_read"}


def test_k_argument_overrides_settings():
    assert rules(check_trace(hand(GOOD), k=3)) == {"trace.early_write"}
    assert rules(check_trace(hand(GOOD), k=1)) == {"trace.extra_read"}


def test_a_missing_read_is_caught():
    events = [R(0), R(2), W(0), R(3), W(1), W(2), Finish("eos")]
    found = check_trace(hand(events))
    assert ("trace.read_order", 1, 2) in {(v.rule, v.event_index, v.source_index)
                                         for v in found}
    assert "trace.unread_source" in rules(found)  # eos, yet only 3 of 4 words were read


@pytest.mark.parametrize("events, rule", [
    ([R(0), R(1, "quack"), W(0), R(2), W(1), R(3), W(2), Finish("eos")], "trace.read_word"),
    ([*GOOD[:-1], Read(4, "extra", (1,)), Finish("eos")], "trace.read_past_end"),
    ([Read(0, "The", ()), *GOOD[1:]], "trace.read_tokens"),
    ([R(0), R(1), W(1), R(2), W(2), R(3), W(3), Finish("eos")], "trace.write_order"),
    ([R(0), R(1), W(0, "  "), *GOOD[3:]], "trace.empty_write"),
    ([W(0), *GOOD], "trace.write_before_read"),
    (GOOD[:-1], "trace.no_finish"),
    ([*GOOD, Finish("eos")], "trace.finish_count"),
    ([*GOOD[:-2], Finish("eos"), GOOD[-2]], "trace.finish_not_last"),
    ([R(0), R(1), W(0), Finish("eos")], "trace.unread_source"),
    ([R(0), R(1), W(0), Finish("early_eos")], "trace.finish_reason"),
    ([R(0), R(1), W(0), DroppedEos(0), R(2), W(1), R(3), W(2), Finish("eos")],
     "trace.dropped_eos"),  # names word 0 but 2 words were read
    ([R(0), R(1), W(0), DroppedEos(1), W(1), R(2), R(3), W(2), Finish("eos")],
     "trace.dropped_eos"),  # not followed by a read
    ([*GOOD[:-1], DroppedEos(3), Finish("eos")], "trace.dropped_eos"),
    ([R(0), R(1), W(0), B(0), R(2), W(1), R(3), W(2), Finish("eos")],
     "trace.blank_run"),  # names word 0 but 2 words were read
    ([R(0), R(1), W(0), B(1), W(1), R(2), R(3), W(2), Finish("eos")],
     "trace.blank_run"),  # not followed by a read
    ([R(0), R(1), W(0), B(1, 2), R(2), W(1), R(3), W(2), Finish("eos")],
     "trace.blank_run"),  # shorter than max_tokens_per_word
    ([*GOOD[:-1], B(3), Finish("cancelled")], "trace.blank_run"),  # the source had ended
    ([Finish("empty_source")], "trace.finish_reason"),  # the source is not empty
])
def test_each_rule_catches_its_broken_trace(events, rule):
    assert rule in rules(check_trace(hand(events)))


def test_settings_rules():
    long_word = [*GOOD[:2], Write(0, " m0", (1, 2)), *GOOD[3:]]
    assert check_trace(hand(long_word, max_tokens_per_word=2)) == []
    found = check_trace(hand(long_word, max_tokens_per_word=1))
    assert [(v.rule, v.target_index) for v in found] == [("trace.word_too_long", 0)]
    assert rules(check_trace(hand(GOOD, max_new_words=3))) == {"trace.max_new_words"}
    capped = [*GOOD[:-2], Finish("max_new_words")]
    assert check_trace(hand(capped, max_new_words=3)) == []
    assert rules(check_trace(hand(capped, max_new_words=2))) == {"trace.max_new_words",
                                                                "trace.finish_reason"}
    dropped = [R(0), R(1), W(0), DroppedEos(1), R(2), W(1), R(3), W(2), Finish("eos")]
    assert check_trace(hand(dropped)) == []
    assert rules(check_trace(hand(dropped, stop_at_first_eos=True))) == {"trace.dropped_eos"}
    assert rules(check_trace(hand(GOOD, k=0))) == {"trace.settings"}


def test_empty_source_and_early_stops():
    assert check_trace(hand([Finish("empty_source")], source=())) == []
    assert rules(check_trace(hand([Finish("eos")], source=()))) == {"trace.finish_reason"}
    assert check_trace(hand([R(0), Finish("cancelled")])) == []
    early = [R(0), R(1), W(0), Finish("early_eos")]
    # Both conventions: all source words, or only those read (what the decoder stores).
    assert check_trace(hand(early, stop_at_first_eos=True)) == []
    assert check_trace(hand(early, source=("The", "quick"), stop_at_first_eos=True)) == []


def test_a_blank_run_forces_one_read_beyond_wait_k():
    assert check_trace(hand([R(0), R(1), W(0), B(1), R(2), W(1), R(3), W(2), Finish("eos")])) == []
    events = [R(0), R(1), W(0), B(1), R(2), R(3), W(1), W(2), Finish("eos")]
    found = check_trace(hand(events))
    assert [(v.rule, v.event_index) for v in found] == [("trace.extra_read", 5)]


def test_a_dropped_eos_forces_one_read_beyond_wait_k():
    events = [R(0), R(1), W(0), DroppedEos(1), R(2), R(3), W(1), W(2), Finish("eos")]
    found = check_trace(hand(events))
    assert [(v.rule, v.event_index) for v in found] == [("trace.extra_read", 5)]


@PROPERTY
@given(trace=valid_traces())
def test_simulated_decoder_traces_pass(trace):
    assert check_trace(trace) == []
    assert check_trace(Trace.from_jsonl(trace.to_jsonl())) == []
    if not any(isinstance(e, (DroppedEos, BlankRun)) for e in trace.events):
        assert check_schedule(trace.delays, len(trace.source_words), trace.settings.k) == []


def _positions(trace, kind):
    return [j for j, e in enumerate(trace.events) if isinstance(e, kind)]


def _with(trace, events):
    return dataclasses.replace(trace, events=tuple(events))


def drop_read(trace, data):
    j = data.draw(st.sampled_from(_positions(trace, Read)))
    # A last read right before an early stop leaves a shorter, equally valid trace.
    after = trace.events[j + 1]
    assume(not (isinstance(after, Finish) and after.reason in ("early_eos", "max_new_words")))
    return _with(trace, trace.events[:j] + trace.events[j + 1:])


def swap_reads(trace, data):
    reads = _positions(trace, Read)
    assume(len(reads) >= 2)
    a, b = sorted(data.draw(st.lists(st.sampled_from(reads), min_size=2, max_size=2,
                                     unique=True)))
    events = list(trace.events)
    events[a], events[b] = events[b], events[a]
    return _with(trace, events)


def write_earlier(trace, data):
    """Move a write in front of the last read before it: one read too early."""
    candidates = [j for j in _positions(trace, Write)
                  if any(isinstance(e, Read) for e in trace.events[:j])]
    assume(candidates)
    j = data.draw(st.sampled_from(candidates))
    r = max(i for i in _positions(trace, Read) if i < j)
    events = list(trace.events)
    events.insert(r, events.pop(j))
    return _with(trace, events)


def duplicate_finish(trace, data):
    j = data.draw(st.integers(0, len(trace.events)))
    return _with(trace, trace.events[:j] + (trace.events[-1],) + trace.events[j:])


def remove_finish(trace, data):
    return _with(trace, trace.events[:-1])


def change_read_word(trace, data):
    j = data.draw(st.sampled_from(_positions(trace, Read)))
    events = list(trace.events)
    events[j] = dataclasses.replace(events[j], word=events[j].word + "x")
    return _with(trace, events)


def drop_inner_write(trace, data):
    writes = _positions(trace, Write)
    assume(len(writes) >= 2)
    j = data.draw(st.sampled_from(writes[:-1]))
    return _with(trace, trace.events[:j] + trace.events[j + 1:])


def read_past_end(trace, data):
    n = len(trace.source_words)
    return _with(trace, trace.events[:-1] + (Read(n, "zz", (1,)), trace.events[-1]))


def shift_dropped_eos(trace, data):
    drops = _positions(trace, DroppedEos)
    assume(drops)
    j = data.draw(st.sampled_from(drops))
    events = list(trace.events)
    index = events[j].source_index + data.draw(st.sampled_from([-1, 1, 2]))
    assume(index >= 0)
    events[j] = DroppedEos(index)
    return _with(trace, events)


def drop_blank_run(trace, data):
    runs = _positions(trace, BlankRun)
    assume(runs)
    j = data.draw(st.sampled_from(runs))
    # Dropping it leaves the read it forced unexplained, unless wait-k asked for it anyway.
    assume(isinstance(trace.events[j + 1], Read))
    return _with(trace, trace.events[:j] + trace.events[j + 1:])


TRACE_MUTATIONS = [drop_read, swap_reads, write_earlier, duplicate_finish, remove_finish,
                   change_read_word, drop_inner_write, read_past_end, shift_dropped_eos,
                   drop_blank_run]


@PROPERTY
@given(trace=valid_traces(), mutate=st.sampled_from(TRACE_MUTATIONS), data=st.data())
def test_every_single_mutation_is_caught(trace, mutate, data):
    assume(trace.reads)
    broken = mutate(trace, data)
    assert check_trace(broken) != [], mutate.__name__
    assert compare_traces(trace, broken) is not None


@st.composite
def scripted_delays(draw):
    """Any non-decreasing delays in 1..N: the schedules of Scripted policies."""
    n = draw(st.integers(1, 8))
    delays = sorted(draw(st.lists(st.integers(1, n), min_size=1, max_size=10)))
    return n, tuple(delays)


@PROPERTY
@given(case=scripted_delays(), k=st.integers(1, 5))
def test_schedule_rules_of_check_trace_agree_with_check_schedule(case, k):
    # A trace with these delays and no trailing read: writes stop at a word limit.
    n, delays = case
    assert schedule(Scripted(delays), n, len(delays)) == delays
    words = [f"w{i}" for i in range(n)]
    events, read = [], 0
    for i, delay in enumerate(delays):
        while read < delay:
            events.append(Read(read, words[read], (read,)))
            read += 1
        events.append(Write(i, f" t{i}", (i,)))
    events.append(Finish("max_new_words"))
    trace = Trace(Settings(model="s", k=k, layout="group", system="S",
                           max_new_words=len(delays)), tuple(words), tuple(events))
    assert (check_trace(trace) == []) == (check_schedule(delays, n, k) == [])


# ------------------------------------------------------------------ compare


def test_identical_traces_with_other_times_do_not_diverge():
    trace = hand(GOOD)
    later = _with(trace, [dataclasses.replace(e, t=e.t + 5.0) for e in trace.events])
    assert compare_traces(trace, later) is None


def test_a_divergence_at_event_7_is_reported_in_context():
    reference = hand(GOOD)
    events = list(GOOD)
    events[7] = Write(3, " m3", (53, 99))
    found = compare_traces(reference, hand(events))
    assert isinstance(found, Divergence)
    assert (found.what, found.event_index) == ("events", 7)
    assert found.expected == GOOD[7] and found.actual == events[7]
    assert found.words_read == ("The", "quick", "brown", "fox")
    assert found.written == ("m0", "m1", "m2")
    text = str(found)
    assert text.splitlines() == [
        'traces diverge at event 7 (after reading 4 word(s) "The quick brown fox" and '
        'writing 3 "m0 m1 m2"): token_ids differ from position 1',
        '  expected: write target 3 " m3" token_ids [53]',
        '  actual:   write target 3 " m3" token_ids [53, 99]',
    ]


def test_settings_and_source_differences_come_first():
    reference = hand(GOOD)
    other = hand(GOOD, k=3)
    found = compare_traces(reference, other)
    assert found.what == "settings" and found.expected == {"k": 2} and found.actual == {"k": 3}
    assert str(found) == "settings differ: k: expected 2, got 3"
    renamed = dataclasses.replace(reference, settings=dataclasses.replace(
        reference.settings, model="elsewhere", extra={"sampler": "greedy"}))
    assert compare_traces(reference, renamed) is None
    assert compare_traces(reference, renamed, ignore_settings=()).what == "settings"
    words = hand(GOOD, source=("The", "quick", "red", "fox"))
    assert compare_traces(reference, words).what == "source_words"
    # A longer source list alone says less than the events: they are compared first.
    longer = hand(GOOD[:-1] + [Finish("cancelled")], source=("The", "quick", "brown", "fox",
                                                               "jumps"))
    assert compare_traces(reference, longer).event_index == 8
    with pytest.raises(ValueError, match="ignore_settings"):
        compare_traces(reference, reference, ignore_settings=("speed",))


@PROPERTY
@given(trace=valid_traces(), data=st.data())
def test_compare_finds_the_first_changed_event(trace, data):
    tokens = [j for j, e in enumerate(trace.events) if isinstance(e, (Read, Write))]
    assume(tokens)
    j = data.draw(st.sampled_from(tokens))
    events = list(trace.events)
    kind = data.draw(st.sampled_from(["token", "text", "drop", "insert"]))
    if kind == "token":
        ids = list(events[j].token_ids)
        ids[data.draw(st.integers(0, len(ids) - 1))] += 1
        events[j] = dataclasses.replace(events[j], token_ids=tuple(ids))
    elif kind == "text":
        field = "word" if isinstance(events[j], Read) else "text"
        events[j] = dataclasses.replace(events[j], **{field: getattr(events[j], field) + "!"})
    elif kind == "drop":
        del events[j]
    else:
        events.insert(j, Finish("cancelled"))
    broken = _with(trace, events)
    expected = next(i for i, (a, b) in enumerate(zip(trace.events + (None,),
                                                     broken.events + (None,), strict=False))
                    if a != b)
    found = compare_traces(trace, broken)
    assert (found.what, found.event_index) == ("events", expected)
    if kind == "token":
        assert "token_ids differ" in found.message


# ------------------------------------------------------------- files, CLI


def write(path: Path, *traces: Trace) -> Path:
    path.write_text("".join(t.to_jsonl() for t in traces), encoding="utf-8")
    return path


def run(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="simulref")
    add_verify_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["verify", *argv])
    out, err = io.StringIO(), io.StringIO()
    sys_out, sys_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = args.run(args)
    finally:
        sys.stdout, sys.stderr = sys_out, sys_err
    return code, out.getvalue(), err.getvalue()


def test_cli_passes_good_traces_and_reports_each_trace(tmp_path):
    path = write(tmp_path / "t.jsonl", hand(GOOD), hand(GOOD))
    assert run(str(path)) == (0, "trace 0: PASS\ntrace 1: PASS\nPASS (2 trace(s))\n", "")
    bad = write(tmp_path / "b.jsonl", hand(GOOD), hand(GOOD[:-1]))
    code, out, err = run(str(bad))
    assert code == 1 and err == ""
    assert out.splitlines() == [
        "trace 0: PASS", "trace 1: FAIL",
        "  trace.no_finish: event 8: a trace must end with a finish event (and its reason)",
        "FAIL (1 of 2 trace(s))"]
    code, out, _ = run(str(path), "-k", "3")
    assert code == 1 and "trace.early_write" in out


def test_cli_reports_a_header_that_disagrees_with_its_events(tmp_path):
    lines = hand(GOOD).to_jsonl().splitlines()
    header = json.loads(lines[0])
    header["delays"] = [2, 2, 4, 4]
    header["target_words"][1] = "other"
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="disagrees"):
        read_traces(path)  # the strict reader refuses it; verify reports it
    [(trace, found)] = load_traces(path)
    assert trace == hand(GOOD)
    assert [(v.rule, v.actual) for v in found] == [
        ("trace.header", ["m0", "other", "m2", "m3"]), ("trace.header", [2, 2, 4, 4])]
    assert check_header(header, trace) == found
    code, out, _ = run(str(path))
    assert code == 1 and "trace.header: header delays disagrees" in out


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("{not json\n", "line 1: expected a JSON object, got invalid JSON"),
    ('{"record": "read", "source_index": 0, "word": "a", "token_ids": [1]}\n',
     "line 1: expected a 'trace' header"),
    ("", "no trace"),
    ("[1]\n", "expected a JSON object"),
])
def test_cli_unreadable_input_is_one_line_and_exit_2(tmp_path, content, message):
    path = tmp_path / "x.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    code, out, err = run(str(path))
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and message in err, err


def test_cli_unreadable_event_keeps_the_file_line_number(tmp_path):
    text = hand(GOOD).to_jsonl() + hand(GOOD).to_jsonl().replace('"source_index": 2',
                                                                 '"source_index": -2')
    path = tmp_path / "x.jsonl"
    path.write_text(text, encoding="utf-8")
    code, _, err = run(str(path))
    # Line 15: the fourth event of the second trace, as the strict reader says too.
    assert code == 2 and "line 15: bad read record" in err, err
    with pytest.raises(ValueError, match="^line 15: bad read record"):
        read_traces(path)


def test_cli_against_a_reference(tmp_path):
    ref = write(tmp_path / "ref.jsonl", hand(GOOD))
    events = list(GOOD)
    events[7] = Write(3, " autre", (77,))
    cand = write(tmp_path / "cand.jsonl", hand(events))
    assert run(str(cand), "--against", str(ref))[0] == 1
    code, out, _ = run(str(cand), "--against", str(ref))
    assert "  traces diverge at event 7" in out and '" autre"' in out
    assert run(str(ref), "--against", str(ref))[0] == 0
    two = write(tmp_path / "two.jsonl", hand(GOOD), hand(GOOD))
    code, out, _ = run(str(two), "--against", str(ref))
    assert code == 1 and out.startswith(f"FAIL: {ref} holds 1 trace(s)")
    assert run(str(ref), "--against", str(tmp_path / "missing.jsonl"))[0] == 2


def test_cli_options(tmp_path):
    with pytest.raises(SystemExit):
        run("t.jsonl", "-k", "0")
    out = io.StringIO()
    path = write(tmp_path / "t.jsonl", hand(GOOD))
    assert run_verify_cli(path, k=2, out=out) == 0 and out.getvalue().endswith("PASS (1 "
                                                                                "trace(s))\n")
    with pytest.raises(ValueError, match="k"):
        run_verify_cli(path, k=0)


def test_violation_and_divergence_are_frozen_and_readable():
    v = Violation("trace.read_word", "the word read differs", event_index=3, source_index=1,
                  expected="quick", actual="quack")
    assert str(v) == ('trace.read_word: event 3, source 1: the word read differs '
                      '(expected "quick", got "quack")')
    assert str(Violation("prompt.spans", "x", expected=None, actual=3)) == (
        "prompt.spans: x (expected null, got 3)")
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.rule = "other"


# ------------------------------------------------------- real decoder, golden

SNAPSHOT_DIR = ROOT / "tests" / "golden" / "__snapshots__"
GOLDEN = sorted(p for pattern in ("**/*.json", "**/*.jsonl") for p in SNAPSHOT_DIR.glob(pattern))


def _trace_texts(value):
    """JSON Lines trace texts inside a snapshot value (str, list of records, nested)."""
    if isinstance(value, str):
        if '"record": "trace"' in value or '"record":"trace"' in value:
            yield value
    elif isinstance(value, list) and value and all(isinstance(r, dict) and "record" in r
                                                   for r in value):
        yield "".join(json.dumps(r) + "\n" for r in value)
    elif isinstance(value, list):
        for item in value:
            yield from _trace_texts(item)
    elif isinstance(value, dict):
        if "record" in value:
            yield json.dumps(value) + "\n"
        else:
            for item in value.values():
                yield from _trace_texts(item)


def snapshot_traces(path: Path) -> list[Trace]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return read_traces(text)
    return [t for chunk in _trace_texts(json.loads(text)) for t in read_traces(chunk)]


@pytest.fixture(scope="module")
def decoder_traces():
    import mlx.core as mx

    from simulref.decoder import translate
    from simulref.testing import tiny_model

    tok = tiny_tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    def eos_every(n):  # an EOS now and then, so dropped EOS and early stops occur
        calls = [0]

        def sample(logprobs):
            calls[0] += 1
            return mx.array([eos]) if calls[0] % n == 0 else mx.argmax(logprobs, axis=-1)
        return sample

    traces = []
    for seed, k, n, stop, layout in [(0, 1, 0, False, "group"), (0, 2, 3, False, "group"),
                                     (1, 3, 4, False, "interleaved"), (1, 2, 5, True, "group"),
                                     (2, 4, 7, False, "reencode")]:
        traces.append(translate(
            tiny_model("llama", seed), tok, "The quick brown fox jumps over the lazy dog",
            k=k, layout=layout, max_tokens_per_word=4, stop_at_first_eos=stop,
            sampler=eos_every(n) if n else None))
    assert any(isinstance(e, DroppedEos) for t in traces for e in t.events)
    return traces


def test_real_decoder_traces_pass_and_compare_equal_to_themselves(decoder_traces):
    for trace in decoder_traces:
        assert check_trace(trace) == [], trace.to_jsonl(times=False)
        assert compare_traces(trace, Trace.from_jsonl(trace.to_jsonl(times=False))) is None
    prompt = assemble(tiny_tokenizer(), "The quick brown fox jumps over the lazy dog",
                      system=DEFAULT_SYSTEM)
    assert check_prompt(prompt.ids, prompt.spans, tiny_tokenizer(), DEFAULT_SYSTEM,
                        prompt.words) == []
    # The decoder's reads carry the prompt's word segments, the suffix on the last one.
    reads = decoder_traces[0].reads
    assert [r.token_ids for r in reads[:-1]] == list(prompt.segments[1:-2])
    assert reads[-1].token_ids == prompt.segments[-2] + prompt.segments[-1]


@pytest.mark.parametrize("path", ["tiny-decoder", *GOLDEN],
                         ids=lambda p: p if isinstance(p, str) else str(p.relative_to(ROOT)))
def test_snapshot_traces_pass(path, decoder_traces, tmp_path):
    if path == "tiny-decoder":  # the format a syrupy JSON snapshot of to_jsonl() has
        path = tmp_path / "decoder.json"
        text = "".join(t.to_jsonl(times=False) for t in decoder_traces)
        path.write_text(json.dumps(text), encoding="utf-8")
    traces = snapshot_traces(path)
    assert traces, f"{path}: no trace found"
    for index, trace in enumerate(traces):
        assert check_trace(trace) == [], f"{path} trace {index}"


# ------------------------------------------------------------- docs, schema

DOC = ROOT / "docs" / "verify.md"


def test_the_docs_example_runs_as_written(tmp_path, monkeypatch, capsys):
    text = DOC.read_text(encoding="utf-8")
    python = re.findall(r"```python\n(.*?)```", text, re.S)
    console = re.findall(r"```console\n(.*?)```", text, re.S)
    assert len(python) == 2 and len(console) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python[0], "verify.md[0]", "exec"), namespace)
    # Each "$ simulref verify ..." line, then the output it shows.
    for command, shown in re.findall(r"^\$ (.*)\n((?:[^$].*\n)*)", console[0], re.M):
        argv = shlex.split(command)
        assert argv[:2] == ["simulref", "verify"]
        code, out, err = run(*argv[2:])
        assert (out, err) == (shown, "")
        assert code == (0 if shown.startswith("trace 0: PASS") else 1)
    exec(compile(python[1], "verify.md[1]", "exec"), namespace)
    printed = capsys.readouterr().out
    assert printed.count("trace.early_write") == 3
    assert "traces diverge at event 2" in printed


if importlib.util.find_spec("jsonschema") is not None:
    # Not a declared test dependency (yet); tests/unit/test_trace.py checks the schema with
    # a plain subset validator. This one adds a real validator when it is installed.

    def test_the_docs_trace_and_simulated_traces_match_the_json_schema(tmp_path,
                                                                       monkeypatch):
        import jsonschema

        schema = json.loads((ROOT / "simulref" / "schema" / "trace.schema.json").read_text())
        validator = jsonschema.Draft202012Validator(schema)
        monkeypatch.chdir(tmp_path)
        exec(re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0], {})
        texts = [Path("my_trace.jsonl").read_text(),
                 simulate(["a", "b", "c"], 1, 4, eos_at={1}).to_jsonl()]
        for text in texts:
            for line in text.splitlines():
                validator.validate(json.loads(line))
        broken = json.loads(texts[0].splitlines()[1])
        broken["source_index"] = -1
        assert not validator.is_valid(broken)


def test_event_times_that_go_backwards_are_a_violation():
    timed = [dataclasses.replace(e, t=float(j)) for j, e in enumerate(GOOD)]
    assert check_trace(hand(timed)) == []
    timed[4] = dataclasses.replace(timed[4], t=1.5)  # after 3.0
    found = [v for v in check_trace(hand(timed)) if v.rule == "trace.time_order"]
    assert [(v.event_index, v.actual) for v in found] == [(4, 1.5)]
    assert str(found[0].expected) == ">= 3.0"
    assert check_trace(hand(GOOD)) == []  # all times 0: no order to break


def test_lenient_reader_returns_header_disagreements_as_data(tmp_path):
    from simulref.trace import HeaderDisagreement, read_traces_lenient

    lines = hand(GOOD).to_jsonl().splitlines()
    header = json.loads(lines[0])
    header["finish_reason"] = "cancelled"
    text = hand(GOOD).to_jsonl() + "\n".join([json.dumps(header), *lines[1:]]) + "\n"
    [(first, none), (second, found)] = read_traces_lenient(text)
    assert first == second == hand(GOOD) and none == []
    assert found == [HeaderDisagreement("finish_reason", "cancelled", "eos", len(lines) + 1)]
