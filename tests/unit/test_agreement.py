"""LocalAgreement: the draft fast path gives its twin's traces (token by token), commits
are the agreed prefix and never retracted, and the draft saves forwards."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from traces import untimed

from simulref.agreement import common_prefix
from simulref.cache import TARGET
from simulref.decoder import Feed, translate
from simulref.policy import LocalAgreement
from simulref.prompt import DEFAULT_SYSTEM, template_for
from simulref.testing import successor_model, tiny_model, tiny_tokenizer
from simulref.trace import Hypothesis, Write
from simulref.verify import check_trace

POOL = ("The weather is nice today so we are going to walk in the park I want buy a new "
        "car because my old one broken").split()


# A random tiny model's hypotheses change with every word read (each sees a new budget
# from the header on), so LocalAgreement-2 rarely commits before the end. With its
# attention outputs scaled down, the source sways the model only a little: hypotheses
# often agree, drafts are partly accepted, commits come mid-stream.
LISTENING = 1.0
QUIET = 0.02


@cache
def model_of(arch: str, attention: float = LISTENING):
    import mlx.core as mx

    model = tiny_model(arch, 0)
    if attention != LISTENING:
        for layer in model.layers:
            layer.self_attn.o_proj.weight = layer.self_attn.o_proj.weight * attention
        mx.eval(model.parameters())
    return model


def tok():
    return tiny_tokenizer()


def run(model, words, policy, engine, **options):
    records = []
    trace = translate(model, tok(), words, policy=policy, engine=engine,
                      on_forward=records.append, **options)
    return trace, sum(1 for r in records if r.kind == TARGET)


def committed_is_agreed(trace, n: int) -> None:
    """Every commit is a prefix of the last n hypotheses (of the last one once the source
    ended), and each hypothesis starts with everything committed before it."""
    hypotheses, committed, final = [], [], False
    for e in trace.events:
        if isinstance(e, Hypothesis):
            assert list(e.token_ids[:len(committed)]) == committed  # never retracted
            hypotheses.append(list(e.token_ids))
            final = e.read == len(trace.source_words)
        elif isinstance(e, Write):
            committed += e.token_ids
            assert final or len(hypotheses) >= n
            last = hypotheses[-1:] if final else hypotheses[-n:]
            for h in last:
                assert h[:len(committed)] == committed


@settings(max_examples=25, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2"]), attention=st.sampled_from([LISTENING, QUIET]),
       words=st.lists(st.sampled_from(POOL), min_size=1, max_size=8),
       n=st.integers(1, 3), chunk=st.integers(1, 3),
       max_tokens_per_word=st.sampled_from([2, 4, 50]),
       max_new_words=st.none() | st.integers(0, 8))
def test_the_draft_path_gives_the_twins_trace(arch, attention, words, n, chunk,
                                              max_tokens_per_word, max_new_words):
    policy = LocalAgreement(n, chunk)
    options = dict(max_tokens_per_word=max_tokens_per_word, max_new_words=max_new_words)
    model = model_of(arch, attention)
    twin, twin_forwards = run(model, words, policy, "incremental", **options)
    fast, fast_forwards = run(model, words, policy, "auto", **options)
    assert fast.settings.option("engine") == "draft"
    assert twin.settings.option("engine") == "incremental"
    assert untimed(fast).events == untimed(twin).events
    assert fast_forwards <= twin_forwards
    assert check_trace(fast) == []
    committed_is_agreed(fast, n)


@settings(max_examples=10, deadline=None)
@given(words=st.lists(st.sampled_from(POOL), min_size=1, max_size=8), n=st.integers(1, 3))
def test_a_live_source_gives_the_known_sources_trace_until_its_end(words, n):
    """A Feed read word by word makes the same hypotheses as the known source, up to the
    last word (a live source's end-of-turn suffix comes alone, after it)."""
    feed = Feed()
    for w in words:
        feed.push(w)
    feed.end()
    live, _ = run(model_of("llama"), feed, LocalAgreement(n), "auto", max_new_words=6)
    known, _ = run(model_of("llama"), words, LocalAgreement(n), "auto", max_new_words=6)
    assert untimed(live).events == untimed(known).events


def test_the_draft_saves_forwards_when_hypotheses_agree():
    """A scripted model says the same translation whatever the source: every hypothesis
    after the first is the previous tail confirmed in one forward."""
    tokenizer = tok()
    header_last = template_for(tokenizer, system=DEFAULT_SYSTEM).header_ids[-1]
    script = tokenizer.encode(" Le renard brun saute", add_special_tokens=False)
    chain = [header_last, *script]
    (eos,) = tokenizer.eos_token_ids
    model = successor_model(len(tokenizer), dict(zip(chain, chain[1:], strict=False)), default=eos)
    words = "The quick brown fox jumps over the lazy dog".split()
    twin = translate(model, tokenizer, words, policy=LocalAgreement(2), engine="incremental")
    fast = translate(model, tokenizer, words, policy=LocalAgreement(2), engine="auto")
    assert untimed(fast).events == untimed(twin).events
    # Two equal hypotheses after two words: everything is committed then.
    assert fast.delays == (2, 2, 2, 2)
    assert fast.target_text == "Le renard brun saute"


def test_common_prefix():
    assert common_prefix([[(1,), (2, 3)], [(1,), (2, 3), (4,)]]) == [(1,), (2, 3)]
    assert common_prefix([[(1,), (2,)], [(1,), (2, 3)]]) == [(1,)]
    assert common_prefix([[(1,)]]) == [(1,)]
    assert common_prefix([[], [(1,)]]) == []


@pytest.mark.parametrize(("options", "match"), [
    (dict(layout="interleaved"), "layout: LocalAgreement runs on one cache"),
    (dict(engine="prefilled"), "engine: LocalAgreement runs 'auto'"),
])
def test_bad_settings_for_local_agreement(options, match):
    with pytest.raises(ValueError, match=match):
        translate(model_of("llama"), tok(), "a b", policy=LocalAgreement(2), **options)


# ---------------------------------------------------------------- verify's rule

from dataclasses import replace  # noqa: E402

from simulref.trace import Trace  # noqa: E402
from simulref.verify import check_policy  # noqa: E402


def agreement_trace():
    """Commits mid-stream: hypotheses after the first write."""
    words = "The weather is nice today so we walk".split()
    trace = translate(model_of("llama", QUIET), tok(), words, policy=LocalAgreement(2),
                      max_tokens_per_word=4)
    assert trace.writes and check_policy(trace) == []
    return trace


def rules(trace) -> set[str]:
    return {v.rule for v in check_policy(trace)}


def test_verify_catches_a_commit_the_hypotheses_do_not_agree_on():
    trace = agreement_trace()
    events = list(trace.events)
    j = next(i for i, e in enumerate(events) if isinstance(e, Write))
    events[j] = replace(events[j], token_ids=(events[j].token_ids[0] + 1,))
    assert "policy.local_agreement" in rules(replace(trace, events=tuple(events)))


def test_verify_catches_a_retracted_commit():
    trace = agreement_trace()
    events = list(trace.events)
    first = next(i for i, e in enumerate(events) if isinstance(e, Write))
    j = next(i for i, e in enumerate(events) if isinstance(e, Hypothesis) and i > first)
    events[j] = replace(events[j], token_ids=(1,) + events[j].token_ids[1:])
    found = check_policy(replace(trace, events=tuple(events)))
    assert any("never retracted" in v.message for v in found)


def test_verify_catches_an_early_commit():
    """A commit after one hypothesis (LocalAgreement-2 needs two)."""
    trace = agreement_trace()
    events = list(trace.events)
    h = next(i for i, e in enumerate(events) if isinstance(e, Hypothesis))
    first_write = next(e for e in events if isinstance(e, Write))
    events.insert(h + 1, replace(first_write, target_index=0))
    doctored = Trace(trace.settings, trace.source_words, tuple(
        e for i, e in enumerate(events) if not (isinstance(e, Write) and i > h + 1
                                                and e == first_write)))
    assert any("needs 2 hypotheses" in v.message for v in check_policy(doctored))


def test_generated_tokens_count_every_hypothesis_token():
    """Eval's token count (tokens per second, compute) counts what re-translation
    generates: the twin feeds each generated token once, plus one re-feed (or the
    header) per hypothesis."""
    from simulref.evaluate import generated_tokens

    words = "The weather is nice today so we walk".split()
    twin, forwards = run(model_of("llama"), words, LocalAgreement(2), "incremental",
                         max_tokens_per_word=4)
    assert generated_tokens(twin) == forwards - len(twin.hypotheses)
    assert generated_tokens(twin) > sum(len(w.token_ids) for w in twin.writes)


def test_the_draft_is_partly_accepted_when_the_source_sways_the_model_a_little():
    words = "I want to buy a new car because my old one broken".split()
    twin, twin_forwards = run(model_of("qwen2", QUIET), words, LocalAgreement(2), "incremental")
    fast, fast_forwards = run(model_of("qwen2", QUIET), words, LocalAgreement(2), "auto")
    assert untimed(fast).events == untimed(twin).events
    assert fast_forwards < twin_forwards
    first_write = next(i for i, e in enumerate(fast.events) if isinstance(e, Write))
    assert any(isinstance(e, Hypothesis) for e in fast.events[first_write:])  # mid-stream
