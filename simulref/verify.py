"""Check a prompt, a schedule or a trace against the reference's rules; compare two traces.

Another implementation of simultaneous translation (or a new version of this one) can be
held against simulref without sharing any code: emit traces in the JSON Lines format of
:mod:`simulref.trace`, then

- :func:`check_trace` checks one trace on its own (reads in order and matching the source,
  writes numbered in order and never before wait-k allows, one final finish whose reason
  fits what happened, dropped EOS only where the decoder may drop one),
- :func:`compare_traces` finds the first event where it differs from a reference trace,
- :func:`check_prompt` checks a segmented prompt (the instruction whole in segment 0, each
  source word alone in its own segment, no source in the end-of-turn suffix),
- :func:`check_schedule` checks a list of delays against wait-k,

and ``simulref verify TRACE.jsonl [-k K] [--against REF.jsonl]`` (``simulref.cli``) does
the same from the command line (see docs/verify.md). Checks return lists of
:class:`Violation` (empty: all good) rather than raising, so that every problem of a broken
trace is reported at once.

Pure: no MLX.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .checks import check_int, is_int
from .limits import guard_words
from .trace import (
    BlankRun,
    DroppedEos,
    Event,
    Finish,
    HeaderDisagreement,
    Hypothesis,
    Look,
    Read,
    Settings,
    SourceEnd,
    Trace,
    Write,
    read_traces_lenient,
)

# Finish reasons that say the whole source was read.
_SOURCE_ENDED = ("eos", "max_tokens_per_word")
# Finish reasons the decoder gives while trying to write a word.
_AT_WRITE_ATTEMPT = ("eos", "early_eos", "max_tokens_per_word")
# What may end a stream right after a dropped EOS or a blank run (else it reads on).
_AFTER_FORCED_READ = ("max_new_words", "cancelled", "context_limit")


class _Unset:
    """Marks an expected/actual value that a violation does not have (None is a value)."""

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()


@dataclass(frozen=True)
class Bound:
    """An expected value that is a bound, e.g. ``Bound(">=", 3)``: shown as ``>= 3``."""

    op: str
    value: Any

    def __str__(self) -> str:
        return f"{self.op} {_show(self.value)}"


# ------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Violation:
    """One broken rule: ``rule`` names it (e.g. ``"trace.early_write"``), ``message`` says
    what is wrong; the indices say where (``span``: prompt segment, ``event_index``: position
    in ``trace.events``, ``target_index`` / ``source_index``: target / source word, all
    0-based) and ``expected`` / ``actual`` give the values when there are some."""

    rule: str
    message: str
    span: int | None = None
    event_index: int | None = None
    target_index: int | None = None
    source_index: int | None = None
    expected: Any = UNSET
    actual: Any = UNSET

    @property
    def where(self) -> str:
        parts = []
        if self.span is not None:
            parts.append(f"span {self.span}")
        if self.event_index is not None:
            parts.append(f"event {self.event_index}")
        if self.target_index is not None:
            parts.append(f"target {self.target_index}")
        if self.source_index is not None:
            parts.append(f"source {self.source_index}")
        return ", ".join(parts)

    def __str__(self) -> str:
        text = f"{self.rule}: "
        if self.where:
            text += f"{self.where}: "
        text += self.message
        if self.expected is not UNSET or self.actual is not UNSET:
            text += f" (expected {_show(self.expected)}, got {_show(self.actual)})"
        return text


@dataclass(frozen=True)
class Divergence:
    """Where a candidate trace first departs from a reference trace.

    ``what`` is ``"settings"``, ``"source_words"`` or ``"events"``. For events,
    ``event_index`` is the first differing position, ``expected`` / ``actual`` the
    reference's and the candidate's event there (None when that trace has already ended),
    ``words_read`` / ``written`` the source words read and target words written (in the
    reference) before it. Times are never compared."""

    what: str
    message: str
    event_index: int | None = None
    expected: Any = None
    actual: Any = None
    words_read: tuple[str, ...] = ()
    written: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.what != "events":
            return f"{self.what} differ: {self.message}"
        context = (f"after reading {len(self.words_read)} word(s) "
                   f"{_show(' '.join(self.words_read))} and writing {len(self.written)} "
                   f"{_show(' '.join(self.written))}")
        return (f"traces diverge at event {self.event_index} ({context}): {self.message}\n"
                f"  expected: {describe_event(self.expected)}\n"
                f"  actual:   {describe_event(self.actual)}")


def describe_event(event: Event | None) -> str:
    """One readable line for an event, token ids included, time left out."""
    if event is None:
        return "(end of trace)"
    if isinstance(event, Read):
        return (f"read source {event.source_index} {_show(event.word)} "
                f"token_ids {list(event.token_ids)}")
    if isinstance(event, Write):
        return (f"write target {event.target_index} {_show(event.text)} "
                f"token_ids {list(event.token_ids)}")
    if isinstance(event, DroppedEos):
        return f"dropped EOS after source {event.source_index}"
    if isinstance(event, BlankRun):
        return (f"blank run after source {event.source_index} "
                f"token_ids {list(event.token_ids)}")
    if isinstance(event, SourceEnd):
        return (f"source end after {event.source_index} word(s) "
                f"token_ids {list(event.token_ids)}")
    if isinstance(event, Look):
        return (f"look after {event.read} word(s) token_ids {list(event.token_ids)} "
                f"probs {list(event.probs)}")
    if isinstance(event, Hypothesis):
        return f"hypothesis after {event.read} word(s) token_ids {list(event.token_ids)}"
    if isinstance(event, Finish):
        return f"finish {_show(event.reason)}"
    return repr(event)


def _show(value: Any) -> str:
    if isinstance(value, Bound):
        return str(value)
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, ensure_ascii=False) if _jsonable(value) else repr(value)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# ------------------------------------------------------------------------ arguments


def _int_tuple(name: str, value) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a sequence of ints, got {value!r}")
    out = tuple(value)
    for i, item in enumerate(out):
        if not is_int(item):
            raise TypeError(f"{name}[{i}]: expected an int, got {item!r}")
    return out


def _check_k(value, name: str = "k") -> int:
    return check_int(name, value, minimum=1)


def _words(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, bytes) or not isinstance(value, Sequence):
        raise TypeError(f"words: expected a sequence of str, got {value!r}")
    for i, word in enumerate(value):
        if not isinstance(word, str):
            raise TypeError(f"words[{i}]: expected a str, got {word!r}")
    return tuple(value)


# ------------------------------------------------------------------------- prompts


def _decoder(tokenizer):
    decode = getattr(tokenizer, "decode", None)
    if not callable(decode):
        raise TypeError("tokenizer: expected a Hugging Face tokenizer or mlx-lm "
                        f"TokenizerWrapper (with decode), got {type(tokenizer).__name__}")

    def text(ids: Sequence[int]) -> str:
        try:
            return decode(list(ids), skip_special_tokens=False,
                          clean_up_tokenization_spaces=False)
        except TypeError:  # a plain decode(ids) without Hugging Face's options
            return decode(list(ids))

    return text


def _template_or_none(tokenizer, system: str, chat_format):
    from .prompt import template_for

    if chat_format is not None:
        return template_for(tokenizer, system=system, chat_format=chat_format)
    try:
        return template_for(tokenizer, system=system)
    except (TypeError, ValueError):  # no chat template to discover: fall back to text rules
        return None


def _tiling(ids: tuple[int, ...], spans: Sequence, n_words: int) -> list[Violation]:
    out = []
    if len(spans) != n_words + 2:
        out.append(Violation("prompt.spans", "expected one span for the prefix, one per "
                             "source word and one for the suffix", expected=n_words + 2,
                             actual=len(spans)))
    position = 0
    for j, (start, end) in enumerate(spans):
        if start != position:
            what = "a gap before it" if start > position else "it overlaps the previous span"
            out.append(Violation("prompt.spans", f"spans must tile the ids in order: {what}",
                                 span=j, expected=position, actual=start))
        if end < start:
            out.append(Violation("prompt.spans", "span ends before it starts", span=j,
                                 expected=Bound(">=", start), actual=end))
        position = max(end, start)
    if position != len(ids):
        out.append(Violation("prompt.spans", "the spans must end where the ids end",
                             span=len(spans) - 1, expected=len(ids), actual=position))
    return out


def _segment_texts(ids, spans, decode) -> list[str]:
    """The text each segment adds to the decoded prompt.

    Decoding a lone segment is not enough: SentencePiece tokenizers drop the leading space
    of the first token they decode. The text a segment adds to the decoded ids before it
    has no such edge; where that is not a clean extension (a boundary inside a character),
    the segment is decoded alone, which then fails the checks it should fail.
    """
    texts, before = [], ""
    for start, end in spans:
        upto = decode(ids[:end])
        if upto.startswith(before):
            texts.append(upto[len(before):])
        else:
            texts.append(decode(ids[start:end]))
        before = upto
    return texts


def check_prompt(ids, spans, tokenizer, system: str, words, *,
                 chat_format=None) -> list[Violation]:
    """Check a segmented prompt: ``ids`` the prompt's token ids, ``spans`` its N+2
    ``(start, end)`` segments (prefix, one per source word, suffix), ``words`` the N source
    words, ``system`` the instruction. ``tokenizer``: a Hugging Face tokenizer or mlx-lm
    ``TokenizerWrapper`` (anything with ``decode``; ``encode`` and a chat template for the
    suffix rule).

    Rules, on the text each segment adds to the decoded prompt:

    - ``prompt.spans``: N+2 spans that tile ``ids`` in order, with no gap or overlap;
    - ``prompt.instruction``: segment 0 contains the whole ``system`` text;
    - ``prompt.word``: segment i (1..N) is exactly its word, with a leading space for all
      but the first. This alone keeps every instruction token (and every other word's)
      out of the word segments;
    - ``prompt.suffix``: when a chat format is given or can be discovered from the
      tokenizer, the last segment is exactly the template's suffix ids; otherwise its text
      contains no source word standing alone (between whitespace or text ends), so
      ``"a"`` inside ``"<|im_end|>"`` is no violation.
    """
    ids = _int_tuple("ids", ids)
    if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence):
        raise TypeError(f"spans: expected a sequence of (start, end) pairs, got {spans!r}")
    spans = tuple(_int_tuple(f"spans[{j}]", s) for j, s in enumerate(spans))
    for j, span in enumerate(spans):
        if len(span) != 2:
            raise TypeError(f"spans[{j}]: expected a (start, end) pair, got {span!r}")
    if not isinstance(system, str) or not system:
        raise TypeError(f"system: expected the instruction as a non-empty str, got {system!r}")
    words = _words(words)
    decode = _decoder(tokenizer)

    out = _tiling(ids, spans, len(words))
    if out:
        return out  # the other rules read segments that do not exist
    texts = _segment_texts(ids, spans, decode)
    if system not in texts[0]:
        out.append(Violation("prompt.instruction", "segment 0 must contain the whole "
                             "instruction", span=0, expected=system, actual=texts[0]))
    for i, word in enumerate(words):
        expected = word if i == 0 else " " + word
        if texts[i + 1] != expected:
            out.append(Violation("prompt.word", f"segment of source word {i} must be exactly "
                                 "that word", span=i + 1, source_index=i, expected=expected,
                                 actual=texts[i + 1]))
    out += _check_suffix(ids, spans, texts[-1], tokenizer, system, words, chat_format)
    return out


def _check_suffix(ids, spans, text, tokenizer, system, words, chat_format) -> list[Violation]:
    last = len(spans) - 1
    template = _template_or_none(tokenizer, system, chat_format)
    if template is not None:
        start, end = spans[last]
        if ids[start:end] != tuple(template.suffix_ids):
            return [Violation("prompt.suffix", "the last segment must be the chat template's "
                              "end-of-turn suffix", span=last,
                              expected=list(template.suffix_ids), actual=list(ids[start:end]))]
        return []
    leaked = [w for w in dict.fromkeys(words)
              if re.search(r"(?<!\S)" + re.escape(w) + r"(?!\S)", text)]
    if leaked:
        return [Violation("prompt.suffix", f"the suffix holds source word(s) {leaked}",
                          span=last, actual=text)]
    return []


# ------------------------------------------------------------------------ schedules


def wait_k_delay(k: int, target_index: int, source_length: int) -> int:
    """Source words wait-k has read before target word ``target_index``: ``min(k+i, N)``."""
    return min(k + target_index, source_length)


def check_schedule(delays, source_length: int, k: int) -> list[Violation]:
    """Check ``delays`` (source words read before each target word) against wait-k over a
    source of ``source_length`` words: delay i must be ``min(k + i, N)``. One violation
    (rule ``schedule.wait_k``) per offending target index."""
    delays = _int_tuple("delays", delays)
    try:
        check_int("source_length", source_length, minimum=0)
    except TypeError as error:  # a ValueError here, as before the one checker
        raise ValueError(str(error)) from None
    k = _check_k(k)
    out = []
    for i, delay in enumerate(delays):
        need = wait_k_delay(k, i, source_length)
        if delay != need:
            how = "early" if delay < need else "late"
            out.append(Violation("schedule.wait_k", f"target word written too {how} for "
                                 f"wait-{k} over {source_length} source words",
                                 target_index=i, expected=need, actual=delay))
    return out


# --------------------------------------------------------------------------- traces


def check_trace(trace: Trace, k: int | None = None) -> list[Violation]:
    """Check that ``trace`` is internally consistent and, with a wait-k lag, that it
    follows wait-k. ``k`` defaults to ``trace.settings.k`` (None: no wait-k check).

    A dropped EOS makes the decoder read one more word than wait-k asks, so the wait-k rule
    is checked event by event (every write has at least ``min(k+i, N)`` reads before it;
    every read is one wait-k asks for or the one a dropped EOS forces) rather than on the
    delays alone; without dropped EOS that is exactly :func:`check_schedule` on
    ``trace.delays`` (plus no read that wait-k would not make after the last write).

    N is ``len(trace.source_words)``. The decoder stores only the words it read, so a trace
    that stopped early (``early_eos``, ``max_new_words``, ``cancelled``) may look like it
    read its whole source; rules that would need the true N are then not applied.
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"trace: expected a simulref.trace.Trace, got {type(trace).__name__}")
    out: list[Violation] = []
    if k is not None:
        k = _check_k(k)
    elif trace.settings.k is not None:
        if trace.settings.k < 1:
            out.append(Violation("trace.settings", "settings.k must be a wait-k lag >= 1",
                                 expected=">= 1", actual=trace.settings.k))
        else:
            k = trace.settings.k
    for i, word in enumerate(trace.source_words):
        if word.split() != [word]:
            out.append(Violation("trace.source_word", "a source word must be non-empty and "
                                 "hold no whitespace", source_index=i, actual=word))
    out += _check_finish_events(trace)
    out += _check_times(trace)
    out += _Replay(trace, k).run()
    out += check_policy(trace)
    return out


# ------------------------------------------------------------------ observing policies


def recorded_policy(trace: Trace):
    """The policy a trace's settings name (``extra.policy``, in
    :func:`simulref.policy.parse_policy`'s syntax), or None when it names none or one
    that does not parse (a user's own policy)."""
    from .policy import parse_policy

    name = trace.settings.option("policy")
    if not isinstance(name, str):
        return None
    try:
        return parse_policy(name)
    except ValueError:
        return None


def check_policy(trace: Trace, policy=None) -> list[Violation]:
    """The rule of an observing policy, from the trace alone. ``policy`` defaults to the
    one the settings name; wait-k's rule is :func:`check_trace`'s.

    - Confidence (rule ``policy.confidence``): before the source ended, every write comes
      right after a look at its first token with probability >= threshold, and every read
      past ``k_min`` words (not forced by a dropped EOS or a blank run) right after a look
      below it.
    - LocalAgreement (rule ``policy.local_agreement``): commits come right after a
      hypothesis; everything committed lies in the common prefix of the last n
      hypotheses (of the last one once the source ended, or at the context limit); and
      each hypothesis starts with everything committed before it (never retracted).
    """
    from .policy import Confidence, LocalAgreement

    policy = recorded_policy(trace) if policy is None else policy
    if isinstance(policy, Confidence):
        return _check_confidence(trace, policy)
    if isinstance(policy, LocalAgreement):
        return _check_agreement(trace, policy)
    return []


def _source_ended_flags(trace: Trace) -> list[bool]:
    """Per event: whether the source had ended before it (a live source ends at its
    SourceEnd; a known one with the read of its last word, which carries the suffix)."""
    live = any(isinstance(e, SourceEnd) for e in trace.events)
    n, read, ended, out = len(trace.source_words), 0, False, []
    for e in trace.events:
        out.append(ended)
        if isinstance(e, Read):
            read += 1
            ended = ended or (not live and read >= n)
        elif isinstance(e, SourceEnd):
            ended = True
    return out


def _check_confidence(trace: Trace, policy) -> list[Violation]:
    out, rule, read, written = [], "policy.confidence", 0, 0
    ended = _source_ended_flags(trace)
    events = trace.events
    for j, e in enumerate(events):
        before = events[j - 1] if j else None
        if isinstance(e, Write) and not ended[j]:
            if not isinstance(before, Look):
                out.append(Violation(rule, "before the source ended, a word is written only "
                                     "right after a look", event_index=j,
                                     target_index=e.target_index, expected="look",
                                     actual=describe_event(before)))
            elif not policy.confident(before.probs[0]) or read < policy.k_min:
                out.append(Violation(rule, f"written below the threshold {policy.threshold} "
                                     f"(or before k_min={policy.k_min} words)",
                                     event_index=j, target_index=e.target_index,
                                     expected=Bound(">=", policy.threshold),
                                     actual=before.probs[0]))
            elif e.token_ids[:1] != before.token_ids[:1]:
                out.append(Violation(rule, "the word written starts with the token looked "
                                     "at", event_index=j, target_index=e.target_index,
                                     expected=list(before.token_ids[:1]),
                                     actual=list(e.token_ids[:1])))
        elif isinstance(e, (Read, SourceEnd)):
            # Forced: after a dropped EOS or a blank run, or by the runaway guard (as many
            # words written as the guard allows for the words read).
            forced = (isinstance(before, (DroppedEos, BlankRun))
                      or written >= guard_words(read))
            if read >= policy.k_min and not forced and not ended[j]:
                if not isinstance(before, Look) or policy.confident(before.probs[0]):
                    out.append(Violation(rule, "past k_min, a word is read only after a "
                                         "look below the threshold", event_index=j,
                                         expected=Bound("<", policy.threshold),
                                         actual=describe_event(before)))
        if isinstance(e, Read):
            read += 1
        elif isinstance(e, Write):
            written += 1
    return out


def _check_agreement(trace: Trace, policy) -> list[Violation]:
    out, rule = [], "policy.local_agreement"
    ended = _source_ended_flags(trace)
    at_limit = trace.finish_reason == "context_limit"
    hypotheses: list[tuple[int, ...]] = []
    committed: list[int] = []
    final = False
    events = trace.events
    for j, e in enumerate(events):
        if isinstance(e, Hypothesis):
            if list(e.token_ids[:len(committed)]) != committed:
                out.append(Violation(rule, "a hypothesis starts with everything committed "
                                     "(commits are never retracted)", event_index=j,
                                     expected=list(committed),
                                     actual=list(e.token_ids[:len(committed)])))
            hypotheses.append(e.token_ids)
            final = ended[j] or at_limit and not any(
                isinstance(x, Hypothesis) for x in events[j + 1:])
        elif isinstance(e, Write):
            before = events[j - 1] if j else None
            if not isinstance(before, (Hypothesis, Write)):
                out.append(Violation(rule, "words are committed right after a hypothesis",
                                     event_index=j, target_index=e.target_index,
                                     expected="hypothesis", actual=describe_event(before)))
            committed += e.token_ids
            if not final and len(hypotheses) < policy.n:
                out.append(Violation(rule, f"a commit needs {policy.n} hypotheses before "
                                     "the source ends", event_index=j,
                                     target_index=e.target_index,
                                     expected=Bound(">=", policy.n), actual=len(hypotheses)))
                continue
            last = hypotheses[-1:] if final else hypotheses[-policy.n:]
            for h in last:
                if list(h[:len(committed)]) != committed:
                    out.append(Violation(rule, "a committed word lies in the common prefix "
                                         f"of the last {len(last)} hypotheses",
                                         event_index=j, target_index=e.target_index,
                                         expected=list(h[:len(committed)]),
                                         actual=list(committed)))
                    break
    return out


def _check_times(trace: Trace) -> list[Violation]:
    """Event times come from a monotonic clock: they never go backwards (equal times are
    fine: a trace stored without times has them all 0)."""
    out = []
    for j in range(1, len(trace.events)):
        before, t = trace.events[j - 1].t, trace.events[j].t
        if t < before:
            out.append(Violation("trace.time_order", "event times must not go backwards "
                                 "(they come from a monotonic clock)", event_index=j,
                                 expected=Bound(">=", before), actual=t))
    return out


def _check_finish_events(trace: Trace) -> list[Violation]:
    finishes = [j for j, e in enumerate(trace.events) if isinstance(e, Finish)]
    if not finishes:
        return [Violation("trace.no_finish", "a trace must end with a finish event (and its "
                          "reason)", event_index=len(trace.events))]
    out = []
    for j in finishes[1:]:
        out.append(Violation("trace.finish_count", "exactly one finish event expected",
                             event_index=j, expected=1, actual=len(finishes)))
    if finishes[0] != len(trace.events) - 1:
        out.append(Violation("trace.finish_not_last", "the finish event must be the last "
                             "event", event_index=finishes[0],
                             expected=len(trace.events) - 1, actual=finishes[0]))
    return out


class _Replay:
    """Walk the events once, tracking words read and written, as a decoder would."""

    def __init__(self, trace: Trace, k: int | None):
        self.trace, self.k, self.settings = trace, k, trace.settings
        self.n = len(trace.source_words)
        self.read = 0  # Read events so far: the delay definition of Trace.delays
        self.next_source = 0  # expected next source_index (resynchronized after a gap)
        self.written = 0
        self.next_target = 0
        self.ended = False  # a SourceEnd was seen
        self.out: list[Violation] = []

    def run(self) -> list[Violation]:
        events = self.trace.events
        for j, event in enumerate(events):
            before = events[j - 1] if j else None
            after = events[j + 1] if j + 1 < len(events) else None
            if isinstance(event, Read):
                self.on_read(j, event, before)
            elif isinstance(event, Write):
                self.on_write(j, event)
            elif isinstance(event, DroppedEos):
                self.on_dropped_eos(j, event, after)
            elif isinstance(event, BlankRun):
                self.on_blank_run(j, event, after)
            elif isinstance(event, SourceEnd):
                self.on_source_end(j, event, before)
            elif isinstance(event, (Look, Hypothesis)):
                self.on_observation(j, event)
            else:
                self.on_finish(j, event, before)
        return self.out

    def add(self, rule: str, message: str, **where) -> None:
        self.out.append(Violation(rule, message, **where))

    def need(self) -> int:
        return wait_k_delay(self.k, self.written, self.n)

    def on_read(self, j: int, e: Read, before: Event | None) -> None:
        i = e.source_index
        if self.ended:
            self.add("trace.source_end", "no word is read after the source ended",
                     event_index=j, source_index=i)
        if i != self.next_source:
            self.add("trace.read_order", "source words must be read in order, each once",
                     event_index=j, source_index=i, expected=self.next_source, actual=i)
        self.next_source = i + 1
        if i >= self.n:
            self.add("trace.read_past_end", f"the source has {self.n} word(s)",
                     event_index=j, source_index=i, expected=Bound("<", self.n), actual=i)
        elif e.word != self.trace.source_words[i]:
            self.add("trace.read_word", "the word read differs from the source word",
                     event_index=j, source_index=i, expected=self.trace.source_words[i],
                     actual=e.word)
        if not e.token_ids:
            self.add("trace.read_tokens", "a read must feed at least one token",
                     event_index=j, source_index=i)
        forced = isinstance(before, (DroppedEos, BlankRun))
        if self.k is not None and not forced and self.read < self.n \
                and self.read >= self.need():
            self.add("trace.extra_read", f"wait-{self.k} writes target word {self.written} "
                     f"once {self.need()} word(s) are read; this read is neither asked for "
                     "nor forced by a dropped EOS or a blank run", event_index=j, source_index=i,
                     expected="write", actual="read")
        self.read += 1

    def on_write(self, j: int, e: Write) -> None:
        i = e.target_index
        if i != self.next_target:
            self.add("trace.write_order", "target words must be numbered 0, 1, 2, ... in "
                     "order", event_index=j, target_index=i, expected=self.next_target,
                     actual=i)
        self.next_target = i + 1
        if not e.text.strip() or not e.token_ids:
            self.add("trace.empty_write", "a write must have text beyond whitespace and "
                     "token ids", event_index=j, target_index=i,
                     actual={"text": e.text, "token_ids": list(e.token_ids)})
        cap = self.settings.max_tokens_per_word
        if cap is not None and len(e.token_ids) > cap:
            self.add("trace.word_too_long", "more tokens than settings.max_tokens_per_word",
                     event_index=j, target_index=i, expected=Bound("<=", cap),
                     actual=len(e.token_ids))
        if self.read == 0:
            self.add("trace.write_before_read", "a target word written before any source "
                     "word was read", event_index=j, target_index=i,
                     expected=Bound(">=", 1), actual=0)
        elif self.k is not None and self.read < self.need():
            self.add("trace.early_write", f"wait-{self.k} writes target word {self.written} "
                     f"only after min(k + i, N) = {self.need()} source word(s)",
                     event_index=j, target_index=i, expected=Bound(">=", self.need()),
                     actual=self.read)
        self.written += 1
        limit = self.settings.max_new_words
        if limit is not None and self.written == limit + 1:
            self.add("trace.max_new_words", "more target words than settings.max_new_words",
                     event_index=j, target_index=i, expected=Bound("<=", limit),
                     actual=self.written)

    def on_source_end(self, j: int, e: SourceEnd, before: Event | None) -> None:
        """A live source's end, found by a read attempt: its suffix read alone."""
        if self.ended:
            self.add("trace.source_end", "the source ends once", event_index=j)
        self.ended = True
        if e.source_index != self.read or self.read != self.n:
            self.add("trace.source_end", "the source ends after its last word is read: "
                     "source_index is the number of words read, all of the source",
                     event_index=j, expected=self.n, actual=e.source_index)
        # A live source's length is unknown until it ends: the decoder tries to read
        # while wait-k wants k + i words (not min(k + i, N)), or when forced.
        forced = isinstance(before, (DroppedEos, BlankRun))
        if self.k is not None and not forced and self.read >= self.k + self.written:
            self.add("trace.extra_read", f"wait-{self.k} writes target word {self.written} "
                     f"once {self.k + self.written} word(s) are read; this attempt to read "
                     "is neither asked for nor forced", event_index=j,
                     expected="write", actual="source end")

    def on_observation(self, j: int, e: Look | Hypothesis) -> None:
        """A look or a hypothesis names the words read when it was made (what each
        policy's own rule makes of it: :func:`check_policy`)."""
        if e.read != self.read:
            self.add("trace.observation_read", f"a {describe_event(e)} names the number "
                     "of source words read so far", event_index=j, expected=self.read,
                     actual=e.read)

    def on_dropped_eos(self, j: int, e: DroppedEos, after: Event | None) -> None:
        if self.settings.stop_at_first_eos:
            self.add("trace.dropped_eos", "with settings.stop_at_first_eos an EOS ends the "
                     "translation (finish 'early_eos'); it is never dropped", event_index=j)
        self.check_reads_on("trace.dropped_eos", "a dropped EOS", j, e.source_index, after)

    def on_blank_run(self, j: int, e: BlankRun, after: Event | None) -> None:
        cap = self.settings.max_tokens_per_word
        if cap is not None and len(e.token_ids) != cap:
            self.add("trace.blank_run", "a blank run is cut at exactly "
                     "settings.max_tokens_per_word tokens", event_index=j,
                     expected=cap, actual=len(e.token_ids))
        if self.read >= self.n:
            self.add("trace.blank_run", "once the whole source is read, a word cut by the "
                     "token limit ends the translation (finish 'max_tokens_per_word')",
                     event_index=j, expected=Bound("<", self.n), actual=self.read)
        self.check_reads_on("trace.blank_run", "a blank run", j, e.source_index, after)

    def check_reads_on(self, rule: str, what: str, j: int, source_index: int,
                       after: Event | None) -> None:
        """A dropped EOS or a blank run names the last word read and forces a read next."""
        if self.ended:
            self.add(rule, f"{what} comes only before the source ends", event_index=j)
        if source_index != self.read - 1:
            self.add(rule, f"{what} names the last source word read", event_index=j,
                     source_index=source_index, expected=self.read - 1, actual=source_index)
        if isinstance(after, (Write, DroppedEos, BlankRun)):
            self.add(rule, f"{what} must be followed by a read (the decoder reads on) or by "
                     "the finish", event_index=j + 1, expected="read or finish",
                     actual=describe_event(after))
        elif isinstance(after, Finish) and after.reason not in _AFTER_FORCED_READ:
            self.add(rule, f"only a word limit or a cancel may end the translation right "
                     f"after {what} (the source had not ended)", event_index=j + 1,
                     expected=" or ".join(_AFTER_FORCED_READ), actual=after.reason)

    def on_finish(self, j: int, e: Finish, before: Event | None) -> None:
        reason = e.reason
        if reason == "empty_source":
            if self.n or j:
                self.add("trace.finish_reason", "'empty_source' ends a trace of an empty "
                         f"source, with no other event (here {self.n} source word(s), {j} "
                         "event(s) before it)", event_index=j)
            return
        if not self.n and reason not in ("cancelled", "max_new_words"):
            self.add("trace.finish_reason", "an empty source finishes with 'empty_source'",
                     event_index=j, expected="empty_source", actual=reason)
        if reason in _SOURCE_ENDED and self.read != self.n:
            self.add("trace.unread_source", f"finish {reason!r} comes only once the whole "
                     "source was read", event_index=j, expected=self.n, actual=self.read)
        # A word with content is written before the EOS that ends its attempt, so after a
        # write the attempt was that write's; otherwise the attempt needs its own reads.
        if reason in _AT_WRITE_ATTEMPT and self.n and not isinstance(before, Write):
            need = 1 if self.k is None else self.need()
            if self.read < need:
                self.add("trace.finish_reason", f"finish {reason!r} ends a write attempt, "
                         f"which comes only after {need} source word(s) are read",
                         event_index=j, expected=Bound(">=", need), actual=self.read)
        if reason == "early_eos" and not self.settings.stop_at_first_eos:
            self.add("trace.finish_reason", "'early_eos' needs settings.stop_at_first_eos "
                     "(otherwise an early EOS is dropped)", event_index=j,
                     expected=True, actual=False)
        limit = self.settings.max_new_words
        if reason == "max_new_words" and limit is not None and self.written != limit:
            self.add("trace.finish_reason", "finish 'max_new_words' comes once exactly "
                     "settings.max_new_words target words are written", event_index=j,
                     expected=limit, actual=self.written)


_DERIVED = ("target_words", "delays", "finish_reason")


def check_header(header: Mapping[str, Any], trace: Trace) -> list[Violation]:
    """Check the derived fields a trace header record claims (``target_words``, ``delays``,
    ``finish_reason``) against what ``trace``'s events give (rule ``trace.header``)."""
    if not isinstance(header, Mapping):
        raise TypeError(f"header: expected a mapping (a parsed header record), got {header!r}")
    derived = {"target_words": list(trace.target_words), "delays": list(trace.delays),
               "finish_reason": trace.finish_reason}
    return [Violation("trace.header", f"header {key} disagrees with the events",
                      expected=derived[key], actual=header[key])
            for key in _DERIVED if key in header and header[key] != derived[key]]


# ------------------------------------------------------------------------- compare


def compare_traces(reference: Trace, candidate: Trace, *,
                   ignore_settings: Sequence[str] = ("model", "extra")) -> Divergence | None:
    """The first difference between ``candidate`` and ``reference``, or None.

    In order: settings (all fields but those in ``ignore_settings``: by default the model
    name and free-form extras, labels that differ between implementations), source words
    (a word that differs; when one list only extends the other, the events say more), then
    events, times ignored: the first position where they differ or one trace ends.
    """
    for name, value in (("reference", reference), ("candidate", candidate)):
        if not isinstance(value, Trace):
            raise TypeError(f"{name}: expected a simulref.trace.Trace, "
                            f"got {type(value).__name__}")
    names = {f.name for f in fields(Settings)}
    if isinstance(ignore_settings, str) or not set(ignore_settings) <= names:
        raise ValueError(f"ignore_settings: expected names among {sorted(names)}, "
                         f"got {ignore_settings!r}")
    settings = _settings_difference(reference.settings, candidate.settings, ignore_settings)
    if settings:
        return settings
    words = _source_difference(reference.source_words, candidate.source_words)
    if words and words.expected is not None and words.actual is not None:
        return words  # a changed word, not merely a longer or shorter list
    events = _event_difference(reference.events, candidate.events)
    return events or words


def _settings_difference(ref: Settings, cand: Settings, ignore) -> Divergence | None:
    a, b = ref.to_dict(), cand.to_dict()
    keys = [key for key in a if key not in ignore and a[key] != b[key]]
    if not keys:
        return None
    message = "; ".join(f"{key}: expected {_show(a[key])}, got {_show(b[key])}" for key in keys)
    return Divergence("settings", message, expected={key: a[key] for key in keys},
                      actual={key: b[key] for key in keys})


def _source_difference(ref: tuple[str, ...], cand: tuple[str, ...]) -> Divergence | None:
    for i, (a, b) in enumerate(zip(ref, cand, strict=False)):
        if a != b:
            return Divergence("source_words", f"word {i}: expected {_show(a)}, got {_show(b)}",
                              expected=a, actual=b)
    if len(ref) != len(cand):
        return Divergence("source_words", f"expected {len(ref)} word(s), got {len(cand)}",
                          expected=None, actual=None)
    return None


def _timeless(event: Event) -> Event:
    return replace(event, t=0.0)


def _event_difference(ref: Sequence[Event], cand: Sequence[Event]) -> Divergence | None:
    for j in range(max(len(ref), len(cand))):
        a = ref[j] if j < len(ref) else None
        b = cand[j] if j < len(cand) else None
        if a is not None and b is not None and _timeless(a) == _timeless(b):
            continue
        before = ref[:j]
        return Divergence(
            "events", _how_events_differ(a, b), event_index=j, expected=a, actual=b,
            words_read=tuple(e.word for e in before if isinstance(e, Read)),
            written=tuple(e.word for e in before if isinstance(e, Write)))
    return None


def _how_events_differ(a: Event | None, b: Event | None) -> str:
    if a is None:
        return "the candidate has an event the reference does not"
    if b is None:
        return "the candidate ends here; the reference goes on"
    if type(a) is not type(b):
        return f"expected a {type(a).__name__}, got a {type(b).__name__}"
    parts = []
    for f in fields(a):
        if f.name == "t":
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x == y:
            continue
        if f.name == "token_ids":
            pairs = enumerate(zip(x, y, strict=False))
            at = next((p for p, (u, v) in pairs if u != v), min(len(x), len(y)))
            parts.append(f"token_ids differ from position {at}")
        else:
            parts.append(f"{f.name} differs")
    return "; ".join(parts)


# ------------------------------------------------------------------------- loading


def load_traces(path) -> list[tuple[Trace, list[Violation]]]:
    """The traces in a JSON Lines file, each with the violations of its header's derived
    fields (``target_words``, ``delays``, ``finish_reason``; rule ``trace.header``).

    :func:`simulref.trace.read_traces` refuses a header that disagrees with its events; a
    verifier reports that as a violation instead (the trace parser's lenient mode,
    :func:`simulref.trace.read_traces_lenient`), and reads everything else just as
    strictly. Raises ``OSError`` for an unreadable file and ``ValueError`` (with the line
    number) for malformed JSON Lines.
    """
    return [(trace, [_header_violation(d) for d in disagreements])
            for trace, disagreements in read_traces_lenient(Path(path))]


def _header_violation(disagreement: HeaderDisagreement) -> Violation:
    return Violation("trace.header", f"header {disagreement.key} disagrees with the events",
                     expected=disagreement.events, actual=disagreement.header)
