"""Observing policies in the decoder: Confidence sees the next word's first token and its
probability, every engine gives the same trace, and a look costs no forward."""

from __future__ import annotations

import math
from functools import cache

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from traces import untimed

from simulref.cache import TARGET
from simulref.decoder import Feed, stream, translate
from simulref.policy import LOOK, READ, WRITE, Candidate, Confidence, WaitK
from simulref.prompt import DEFAULT_SYSTEM, template_for
from simulref.testing import successor_model, tiny_model, tiny_tokenizer
from simulref.trace import Look, Read, Trace, Write
from simulref.verify import check_trace

POOL = ("The weather is nice today so we are going to walk in the park I want buy a new "
        "car because my old one broken").split()


@cache
def model_of(arch: str):
    return tiny_model(arch, 0)


def tok():
    return tiny_tokenizer()


def looks(trace) -> list[Look]:
    return [e for e in trace.events if isinstance(e, Look)]


# Engines compute the candidate's probability by different paths (one row or two, a
# prefilled source under a mask, a fused read): float32 rounding differs by ~1e-6.
PROB_TOLERANCE = 1e-4


def same_up_to_probs(a, b) -> bool:
    """Equal traces, but for the looks' probabilities, which agree to PROB_TOLERANCE."""
    if len(a.events) != len(b.events):
        return False
    for x, y in zip(untimed(a).events, untimed(b).events, strict=True):
        if isinstance(x, Look) and isinstance(y, Look):
            if (x.read, x.token_ids) != (y.read, y.token_ids) or any(
                    abs(p - q) > PROB_TOLERANCE for p, q in zip(x.probs, y.probs, strict=True)):
                return False
        elif x != y:
            return False
    return True


def near_threshold(trace, threshold: float) -> bool:
    return any(abs(look.probs[0] - threshold) <= PROB_TOLERANCE for look in looks(trace))


@settings(max_examples=20, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2"]),
       words=st.lists(st.sampled_from(POOL), min_size=1, max_size=7),
       threshold=st.sampled_from([0.0, 0.3, 0.45, 0.6, 0.9]), k_min=st.integers(1, 3),
       max_tokens_per_word=st.sampled_from([2, 50]))
def test_confidence_gives_the_twins_trace_with_every_engine(arch, words, threshold, k_min,
                                                            max_tokens_per_word):
    """incremental (the twin), prefilled (budget masks, row 1 for the next budget) and
    fused (a live source: read and re-feed in one forward) compute the candidate's
    probability three ways: the same looks, probabilities and decisions come out."""
    options = dict(policy=Confidence(threshold, k_min), max_new_words=6,
                   max_tokens_per_word=max_tokens_per_word)
    twin = translate(model_of(arch), tok(), words, engine="incremental", **options)
    assume(not near_threshold(twin, threshold))  # a decision float rounding may flip
    fast = translate(model_of(arch), tok(), words, engine="prefilled", **options)
    live = translate(model_of(arch), tok(), iter(words), engine="fused", **options)
    assert same_up_to_probs(fast, twin)
    assert same_up_to_probs(*(Trace(twin.settings, (), before_last_word(t, len(words)))
                              for t in (live, twin)))
    assert check_trace(twin) == []
    for look in looks(twin):
        assert 0.0 <= look.probs[0] <= 1.0


def before_last_word(trace, n: int) -> list:
    """The events before the last word's read: a live source reads that word without the
    end-of-turn suffix (it comes alone, later), so from there on the runs may differ."""
    out = []
    for e in untimed(trace).events:
        if isinstance(e, Read) and e.source_index == n - 1:
            break
        out.append(e)
    return out


@settings(max_examples=20, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2"]),
       words=st.lists(st.sampled_from(POOL), min_size=1, max_size=7),
       threshold=st.sampled_from([0.3, 0.5, 0.7]))
def test_confidence_writes_exactly_when_sure(arch, words, threshold):
    """The trace's looks are the policy's decisions: a look at or above the threshold is
    followed by the word written (starting with the candidate token), one below it by a
    read; nothing is written unseen before the source ends."""
    trace = translate(model_of(arch), tok(), words, policy=Confidence(threshold),
                      max_new_words=6, engine="incremental")
    events = trace.events
    n = len(words)
    read = 0
    for j, e in enumerate(events):
        if isinstance(e, Read):
            read += 1
        if isinstance(e, Look):
            after = events[j + 1]
            if e.probs[0] >= threshold:
                assert not isinstance(after, Read)
                if isinstance(after, Write):
                    assert after.token_ids[0] == e.token_ids[0]
            else:
                assert isinstance(after, Read)
        if isinstance(e, Write) and read < n:
            assert isinstance(events[j - 1], Look) and events[j - 1].probs[0] >= threshold


def test_the_probability_is_the_softmax_of_the_logits():
    """The scripted model's logits are 20 on the successor, 0 elsewhere: its probability
    is e^20 / (e^20 + V - 1) (1 - 1e-6: 1.0 in float32), whatever the engine."""
    tokenizer = tok()
    header_last = template_for(tokenizer, system=DEFAULT_SYSTEM).header_ids[-1]
    script = tokenizer.encode(" Le renard brun", add_special_tokens=False)
    chain = [header_last, *script]
    (eos,) = tokenizer.eos_token_ids
    model = successor_model(len(tokenizer), dict(zip(chain, chain[1:], strict=False)), default=eos)
    expected = math.exp(20) / (math.exp(20) + len(tokenizer) - 1)
    for engine in ("incremental", "prefilled"):
        trace = translate(model, tokenizer, "a b c d", policy=Confidence(0.5), engine=engine)
        assert looks(trace) and all(look.probs[0] == pytest.approx(expected, abs=1e-5)
                                    for look in looks(trace))
        assert trace.delays == (1, 1, 1)  # sure at once: write after the first word
        # The tiny random model is never that sure: at threshold 1 it reads everything.
        unsure = translate(model_of("llama"), tokenizer, "a b c d", policy=Confidence(1.0),
                           engine=engine, max_new_words=3)
        assert unsure.delays == (4, 4, 4)


def target_forwards(model, words, policy, engine: str) -> int:
    records = []
    translate(model, tok(), words, policy=policy, engine=engine, max_new_words=6,
              on_forward=records.append)
    return sum(1 for r in records if r.kind == TARGET)


class WriteFromKMin:
    """Count-only: read k_min words, then write whatever the model says (Confidence(0)'s
    schedule, and its bet on writing next, without the looks)."""

    def __init__(self, k_min: int):
        self.k_min = k_min

    def decide(self, read, written, source_done, source_length=None):
        return WRITE if source_done or read >= self.k_min else READ


class LookingWaitK:
    """Observing, but deciding as WaitK(k): it looks before every word and ignores what
    it sees."""

    observes = True

    def __init__(self, k: int):
        self.plain = WaitK(k)

    def decide(self, read, written, source_done, source_length=None, candidate=None):
        if candidate is None and not source_done:
            return LOOK
        return self.plain.decide(read, written, source_done, source_length)


@settings(max_examples=20, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2"]),
       words=st.lists(st.sampled_from(POOL), min_size=1, max_size=7),
       k=st.integers(1, 5), engine=st.sampled_from(["incremental", "prefilled", "fused"]),
       target_start=st.sampled_from(["auto", 48]))
def test_a_look_changes_nothing(arch, words, k, engine, target_start):
    """A policy that looks before every word but decides as wait-k gives wait-k's trace,
    with every engine: in particular a look before the first word, followed by a read,
    leaves no header behind computed under that early budget."""
    source = iter(words) if engine == "fused" else words
    options = dict(engine=engine, max_new_words=6, target_start=target_start)
    looked = translate(model_of(arch), tok(), source, policy=LookingWaitK(k), **options)
    source = iter(words) if engine == "fused" else words
    plain = translate(model_of(arch), tok(), source, policy=WaitK(k), **options)
    assert [e for e in untimed(looked).events if not isinstance(e, Look)] == \
        list(untimed(plain).events)


@settings(max_examples=8, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2"]),
       words=st.lists(st.sampled_from(POOL), min_size=2, max_size=7),
       k_min=st.integers(1, 3), engine=st.sampled_from(["incremental", "prefilled"]))
def test_a_look_costs_no_forward(arch, words, k_min, engine):
    """Confidence(0) looks before every word and always writes: the same trace as the
    count-only policy with its schedule, and as many target forwards with the twin. (The
    prefilled engine runs an observing policy one step at a time, where the count-only
    one is pipelined and may feed a step ahead that the run's end wastes: never more.)"""
    assume(k_min < len(words))  # else the source is done before any look
    model = model_of(arch)
    trace = translate(model, tok(), words, policy=Confidence(0.0, k_min), engine=engine,
                      max_new_words=6)
    assert looks(trace)
    same = WriteFromKMin(k_min)
    plain = translate(model, tok(), words, policy=same, engine=engine, max_new_words=6)
    assert [e for e in untimed(trace).events if not isinstance(e, Look)] == \
        list(untimed(plain).events)
    looked = target_forwards(model, words, Confidence(0.0, k_min), engine)
    plain = target_forwards(model, words, same, engine)
    assert looked == plain if engine == "incremental" else looked <= plain


def test_a_feed_looks_once_per_decision():
    """Waiting for a pushed word does not repeat the look (nor its record)."""
    from simulref.decoder import NEED_INPUT

    feed = Feed()
    events = stream(model_of("llama"), tok(), feed, policy=Confidence(0.99), max_new_words=4)
    got = []
    words = iter(["The", "weather", "is", "nice"])
    for e in events:
        if e is NEED_INPUT:
            for _ in range(2):  # ask twice before pushing: no second look
                assert next(events) is NEED_INPUT
            word = next(words, None)
            if word is None:
                feed.end()
            else:
                feed.push(word)
            continue
        got.append(e)
    reads_and_looks = [type(e).__name__ for e in got if isinstance(e, (Read, Look))]
    for a, b in zip(reads_and_looks, reads_and_looks[1:], strict=False):
        assert (a, b) != ("Look", "Look")


def test_confidence_decisions():
    c = Confidence(0.5, k_min=2)
    assert c.decide(1, 0, False) is READ  # below k_min: no look
    assert c.decide(2, 0, False) is LOOK
    assert c.decide(2, 0, False, candidate=Candidate((5,), (0.5,))) is WRITE
    assert c.decide(2, 0, False, candidate=Candidate((5,), (0.49,))) is READ
    assert c.decide(0, 0, True) is WRITE  # the source ended: always write
    with pytest.raises(TypeError, match="candidate: expected a Candidate"):
        c.decide(2, 0, False, candidate=0.7)


# ---------------------------------------------------------------- verify's rule

from dataclasses import replace  # noqa: E402

from simulref.verify import check_policy  # noqa: E402


def confidence_trace():
    trace = translate(model_of("llama"), tok(), "The weather is nice today so we walk",
                      policy=Confidence(0.5), max_new_words=6)
    assert check_policy(trace) == [] and check_trace(trace) == []
    return trace


def test_verify_catches_a_word_written_below_the_threshold():
    trace = confidence_trace()
    events = list(trace.events)
    j = next(i for i, e in enumerate(events) if isinstance(e, Look)
             and isinstance(events[i + 1], Write) and i + 1 < len(events))
    events[j] = replace(events[j], probs=(0.49,))
    found = check_policy(replace(trace, events=tuple(events)))
    assert [v.rule for v in found] == ["policy.confidence"]
    assert "below the threshold" in found[0].message


def test_verify_catches_a_read_while_sure():
    trace = confidence_trace()
    events = list(trace.events)
    j = next(i for i, e in enumerate(events) if isinstance(e, Look)
             and isinstance(events[i + 1], Read))
    events[j] = replace(events[j], probs=(0.9,))
    assert {v.rule for v in check_policy(replace(trace, events=tuple(events)))} == \
        {"policy.confidence"}


def test_verify_catches_an_unseen_write():
    trace = confidence_trace()
    events = [e for e in trace.events if not isinstance(e, Look)]
    assert "policy.confidence" in {v.rule for v in check_policy(replace(trace,
                                                                      events=tuple(events)))}


def test_translate_batch_gives_one_at_a_time_traces_for_every_policy():
    """Observing policies and LocalAgreement are decoded one at a time in a batch's turn
    (not in its rows yet): the same traces as translate(), wait-k rows beside them."""
    from simulref.batch import Finished, Item, decode_items
    from simulref.config import DecodeConfig
    from simulref.policy import LocalAgreement, WaitK

    sentences = ["The weather is nice today", "I want to buy a new car", "so we walk"]
    policies = [WaitK(2), Confidence(0.5), LocalAgreement(2)]
    items = [Item((s, p.name), s, DecodeConfig(policy=p, max_new_words=5))
             for s in sentences for p in policies]
    done = {f.key: f.trace for f in decode_items(model_of("llama"), tok(), items,
                                                 batch_size=4, model_id="tiny")
            if isinstance(f, Finished)}
    for item in items:
        alone = translate(model_of("llama"), tok(), item.source, item.config,
                          model_id="tiny")
        assert untimed(done[item.key]).events == untimed(alone).events, item.key


@settings(max_examples=10, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2"]),
       words=st.lists(st.sampled_from(POOL), min_size=2, max_size=6),
       threshold=st.sampled_from([0.3, 0.5, 0.7]))
def test_a_looks_probability_is_that_of_the_forward_that_predicted_it(arch, words,
                                                                      threshold):
    """Each look's token is the argmax of one of the last two target forwards before it
    (the one after the last token fed; the next may be the token fed ahead), and its
    probability is the softmax of that forward's logits at the token: not a stale one."""
    import mlx.core as mx

    forwards = []
    for event in stream(model_of(arch), tok(), words, policy=Confidence(threshold),
                        engine="incremental", max_new_words=5,
                        on_forward=lambda f: f.kind == TARGET and forwards.append(
                            mx.softmax(f.logits.astype(mx.float32), axis=-1))):
        if isinstance(event, Look):
            (token,), (prob,) = event.token_ids, event.probs
            last = [p for p in forwards[-2:] if int(mx.argmax(p).item()) == token]
            assert last, "no recent forward predicted the looked-at token"
            assert any(abs(p[token].item() - prob) < 1e-5 for p in last)


def test_a_confident_loop_before_the_source_ends_is_stopped_by_the_guard():
    """A model that says " a" forever, with certainty: Confidence writes without reading
    until the guard (2 r + 10 words for r read) makes it read; then the source ends and
    the usual guard ends the run. verify accepts the forced reads."""
    from simulref.limits import guard_words
    from simulref.verify import check_policy

    tokenizer = tok()
    (a,) = tokenizer.encode(" a", add_special_tokens=False)
    model = successor_model(len(tokenizer), {}, default=a)
    words = "The weather is nice".split()
    for engine in ("incremental", "prefilled"):
        trace = translate(model, tokenizer, words, policy=Confidence(0.5), engine=engine)
        n = len(words)
        expected = [1] * guard_words(1) + [
            r for r in range(2, n + 1) for _ in range(guard_words(r) - guard_words(r - 1))]
        expected += [n] * (guard_words(n) - len(expected))
        assert list(trace.delays) == expected, engine
        assert trace.finish_reason == "max_new_words"
        assert check_policy(trace) == [] and check_trace(trace) == []
