"""decoder.Feed: a source pushed word by word, with NEED_INPUT instead of blocking.

The list source is the slow, obviously-correct twin: whatever order the words are pushed
in, a Feed run must give the same events (times aside) as the same words given up front,
and NEED_INPUT must appear exactly where the list run's next event is a Read of a word
that has not been pushed yet.
"""

from __future__ import annotations

import pickle
from dataclasses import replace
from functools import cache

import mlx.core as mx
import mlx.nn as nn
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import KVCache
from traces import untimed as untimed_trace

from simulref.decoder import NEED_INPUT, Feed, stream, translate
from simulref.policy import Scripted, WaitK
from simulref.prompt import DEFAULT_SYSTEM, template_for
from simulref.testing import tiny_model, tiny_tokenizer
from simulref.trace import DroppedEos, Finish, Read, Write

POOL = ("The weather is nice today so we are going to walk in the park I want buy a new "
        "car because my old one broken quick brown fox jumps over lazy dog").split()


@cache
def model_of(arch: str):
    return tiny_model(arch, 0)


def tok():
    return tiny_tokenizer()


def untimed(events):
    return [replace(e, t=0.0) for e in events]


def run_feed(model, words, pushes, *, final="last", **kw):
    """Drive ``stream`` over a Feed: before the i-th ``next()`` push ``pushes[i]`` more
    words (0 past the end of ``pushes``); on NEED_INPUT with nothing scheduled, push one.
    The final word goes in with ``last=True`` (``final="last"``) or plainly, followed at
    once by ``end()`` (``final="end"``).

    Returns (events without NEED_INPUT, [(position in those events, words waiting)] for
    every NEED_INPUT)."""
    feed = Feed()
    pushed = 0

    def push(n):
        nonlocal pushed
        for _ in range(min(n, len(words) - pushed)):
            is_final = pushed == len(words) - 1
            feed.push(words[pushed], last=is_final and final == "last")
            pushed += 1
            if is_final and final == "end":
                feed.end()
        if not words and n:
            feed.end()

    events, needs = [], []
    it = stream(model, tok(), feed, **kw)
    calls = 0
    while True:
        push(pushes[calls] if calls < len(pushes) else 0)
        calls += 1
        try:
            event = next(it)
        except StopIteration:
            return events, needs
        if event is NEED_INPUT:
            needs.append((len(events), feed.waiting))
            push(1)
            continue
        events.append(event)


def policies():
    waitk = st.integers(1, 5).map(WaitK)
    scripted = st.lists(st.integers(1, 4), min_size=1, max_size=6).map(
        lambda d: Scripted(tuple(sorted(d))))
    return st.one_of(waitk, scripted)


@settings(max_examples=30, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2"]),
       words=st.lists(st.sampled_from(POOL), min_size=0, max_size=9),
       policy=policies(),
       layout=st.sampled_from(["group", "interleaved", "reencode"]),
       pushes=st.lists(st.integers(0, 3), max_size=20),
       final=st.sampled_from(["last", "end"]))
def test_a_feed_gives_the_list_trace_and_asks_exactly_when_a_word_is_missing(
        arch, words, policy, layout, pushes, final):
    model = model_of(arch)
    kw = dict(policy=policy, layout=layout, max_new_words=12)
    expected = untimed_trace(translate(model, tok(), words, **kw))
    events, needs = run_feed(model, words, pushes, final=final, **kw)
    assert untimed(events) == list(expected.events)
    for position, waiting in needs:
        # Asked only with nothing waiting, and only where the run reads next (or, for an
        # empty source, where it learns that there is nothing to read).
        assert waiting == 0
        assert isinstance(expected.events[position], Read if words else Finish)
    # Conversely, every read of a word pushed only on demand was asked for: with no
    # scheduled pushes, the stream asks before every single read.
    lazy_events, lazy_needs = run_feed(model, words, [], final=final, **kw)
    reads = [i for i, e in enumerate(lazy_events) if isinstance(e, Read)]
    assert [p for p, _ in lazy_needs] == (reads if words else [0])
    assert untimed(lazy_events) == list(expected.events)


def test_a_complete_feed_translates_to_the_list_trace():
    model = model_of("llama")
    words = POOL[:7]
    expected = untimed_trace(translate(model, tok(), words, k=2, max_new_words=10))
    feed = Feed()
    for i, w in enumerate(words):
        feed.push(w, last=i == len(words) - 1)
    assert untimed_trace(translate(model, tok(), feed, k=2, max_new_words=10)) == expected
    ended = Feed()
    for w in words:
        ended.push(w)
    ended.end()  # nothing read yet: the last pushed word takes the suffix
    assert untimed_trace(translate(model, tok(), ended, k=2, max_new_words=10)) == expected


def test_the_last_pushed_word_carries_the_suffix_and_no_other():
    template = template_for(tok(), system=DEFAULT_SYSTEM)
    feed = Feed()
    it = stream(model_of("qwen2"), tok(), feed, k=1, max_new_words=6)
    assert next(it) is NEED_INPUT
    feed.push("The")
    read = next(it)
    assert read == Read(0, "The", template.word_ids(0, "The"), read.t)
    events = []
    while not (events and isinstance(events[-1], Finish)):
        event = next(it)
        if event is NEED_INPUT:
            feed.push("weather", last=True)
            continue
        events.append(event)
    last = [e for e in events if isinstance(e, Read)]
    assert [r.word for r in last] == ["weather"]
    assert last[0].token_ids == template.word_ids(1, "weather") + template.suffix_ids


class ConstantLM(nn.Module):
    """Always predicts ``token`` (through a real KV cache), e.g. EOS at every step."""

    def __init__(self, vocab_size: int, token: int):
        super().__init__()
        self.logits = mx.where(mx.arange(vocab_size) == token, 20.0, 0.0)

    def make_cache(self):
        return [KVCache()]

    def __call__(self, inputs, cache=None):
        n = inputs.shape[1]
        if cache is not None:
            kv = mx.zeros((1, 1, n, 1))
            cache[0].update_and_fetch(kv, kv)
        return mx.broadcast_to(self.logits, (1, n, self.logits.shape[0]))


def test_a_forced_read_after_a_dropped_eos_survives_the_wait_for_input():
    """k=1 and a model that only says EOS: each EOS before the end is dropped and forces a
    read. The word is not there yet, so the stream asks; after the push it must read, not
    ask the policy again (which would say write and drop another EOS)."""
    eos = tok().eos_token_id
    model = ConstantLM(len(tok()), eos)
    words = POOL[:4]
    expected = untimed_trace(translate(model, tok(), words, k=1))
    kinds = [type(e) for e in expected.events]
    assert kinds == [Read, DroppedEos, Read, DroppedEos, Read, DroppedEos, Read, Finish]
    events, needs = run_feed(model, words, [], k=1)
    assert untimed(events) == list(expected.events)
    assert [p for p, _ in needs] == [0, 2, 4, 6]


def test_asking_again_without_pushing_changes_nothing():
    model = model_of("llama")
    words = POOL[:5]
    expected = untimed_trace(translate(model, tok(), words, k=2, max_new_words=8))
    feed = Feed()
    it = stream(model, tok(), feed, k=2, max_new_words=8)
    events, asked = [], 0
    for event in it:
        if event is NEED_INPUT:
            asked += 1
            if asked % 3:  # twice in three: ask again with nothing pushed
                continue
            n = len(feed.words)
            feed.push(words[n], last=n == len(words) - 1)
            continue
        events.append(event)
    assert untimed(events) == list(expected.events)
    assert asked == 3 * len(words)


def test_an_ended_empty_feed_is_an_empty_source():
    feed = Feed()
    it = stream(model_of("llama"), tok(), feed, k=3)
    assert next(it) is NEED_INPUT
    feed.end()
    events = list(it)
    assert [type(e) for e in events] == [Finish] and events[0].reason == "empty_source"


def test_feed_state():
    feed = Feed()
    assert (feed.words, feed.waiting, feed.complete) == ((), 0, False)
    feed.push("a")
    feed.push("b", last=True)
    assert (feed.words, feed.waiting, feed.complete) == (("a", "b"), 2, True)
    assert repr(feed) == "Feed(2 words, 0 read, complete)"
    feed.end()  # idempotent
    assert feed.complete


def test_need_input_is_one_named_marker():
    assert repr(NEED_INPUT) == "NEED_INPUT"
    assert type(NEED_INPUT)() is NEED_INPUT
    assert pickle.loads(pickle.dumps(NEED_INPUT)) is NEED_INPUT
    assert not isinstance(NEED_INPUT, (Read, Write, DroppedEos, Finish))


# ---------------------------------------------------------------- bad input


def test_pushing_after_the_last_word_is_an_error():
    feed = Feed()
    feed.push("one", last=True)
    with pytest.raises(ValueError, match=r"Feed.push\('two'\): the source already ended"):
        feed.push("two")
    ended = Feed()
    ended.end()
    with pytest.raises(ValueError, match="already ended"):
        ended.push("late")


def test_end_after_the_final_word_was_read_is_an_error():
    feed = Feed()
    it = stream(model_of("llama"), tok(), feed, k=3)
    assert next(it) is NEED_INPUT
    feed.push("The")
    assert isinstance(next(it), Read)
    assert next(it) is NEED_INPUT  # wait-3 wants a second word
    with pytest.raises(ValueError, match="push the final word with last=True"):
        feed.end()
    assert not feed.complete
    feed.push("weather", last=True)  # still usable: the proper way to finish
    assert [e.word for e in it if isinstance(e, Read)] == ["weather"]


@pytest.mark.parametrize("word, last, error, match", [
    (3, False, TypeError, "word: expected a str"),
    (b"a", False, TypeError, "word: expected a str"),
    ("", False, ValueError, "word: expected one non-empty word"),
    ("two words", False, ValueError, "without whitespace"),
    ("a", 1, TypeError, "last: expected a bool"),
])
def test_bad_pushes(word, last, error, match):
    feed = Feed()
    with pytest.raises(error, match=match):
        feed.push(word, last=last)
    assert feed.words == ()


def test_a_feed_drives_one_stream_and_translate_needs_it_complete():
    feed = Feed()
    with pytest.raises(ValueError, match="translate\\(\\) needs a complete Feed"):
        translate(model_of("llama"), tok(), feed, k=3)
    stream(model_of("llama"), tok(), feed, k=3)
    with pytest.raises(ValueError, match="already drives another stream"):
        stream(model_of("llama"), tok(), feed, k=3)
