"""The decoder against slow, obviously-correct twins.

- every logit it samples from matches a NumPy forward (tests/unit/oracle.py) over the same
  tokens, positions and mask, rebuilt from the slots the decoder reports;
- in the group layout the source part of the cache is a one-shot prefill of the source;
- with k >= N every layout reproduces mlx_lm.stream_generate token for token;
- a scripted model (a real mlx nn.Module speaking the cache protocol, whose next token is
  a fixed function of the last token fed) pins down the schedule, word boundaries, EOS
  handling and limits.

Tolerance: the oracle agrees with mlx-lm's own float32 forward to ~4e-5 on logits of size
~15 (checked below); ATOL = 5e-4 leaves a 10x margin, while a wrong position or mask moves
logits by O(0.1-1) (see the break checks in docs/decoder.md).
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from dataclasses import replace
from functools import cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import KVCache, make_prompt_cache
from oracle import Oracle, budget_mask, causal, layout_mask, layout_positions
from traces import untimed

from simulref import decoder
from simulref.cache import SOURCE, TARGET
from simulref.config import DecodeConfig
from simulref.decoder import LAYOUTS, stream, token_table, translate
from simulref.policy import ReadAll, Scripted, WaitK
from simulref.prompt import DEFAULT_SYSTEM, assemble, template_for
from simulref.testing import successor_model, tiny_model, tiny_tokenizer
from simulref.trace import BlankRun, DroppedEos, Finish, Read, SourceEnd, Write
from simulref.verify import check_trace

ATOL = 5e-4
POOL = ("The weather is nice today so we are going to walk in the park I want buy a new "
        "car because my old one broken quick brown fox jumps over lazy dog").split()
SENTENCE = "The weather is nice today so we are going to walk".split()


@cache
def model_of(arch: str, seed: int = 0):
    return tiny_model(arch, seed)


@cache
def oracle_of(arch: str, seed: int = 0):
    return Oracle(model_of(arch, seed))


def tok():
    return tiny_tokenizer()


def with_eos(tokenizer, extra: int):
    out = copy.copy(tokenizer)
    out.eos_token_ids = set(tokenizer.eos_token_ids) | {extra}
    return out


def target_tokens(trace) -> list[int]:
    return [t for w in trace.writes for t in w.token_ids]


# ---------------------------------------------------------------- the oracle itself


def llama_traditional_rope():
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=2,
                           intermediate_size=64, num_attention_heads=4, num_key_value_heads=1,
                           rms_norm_eps=1e-5, vocab_size=64, rope_traditional=True,
                           tie_word_embeddings=False, attention_bias=True)
    mx.random.seed(3)
    return llama.Model(args)


@pytest.mark.parametrize("make", [lambda: model_of("llama"), lambda: model_of("qwen2"),
                                  llama_traditional_rope],
                         ids=["llama", "qwen2", "llama-traditional-rope-gqa4-bias"])
def test_oracle_matches_mlx_lm_plain_forward(make):
    model = make()
    vocab = model.args.vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, 40)
    reference = np.array(model(mx.array(ids)[None])[0])
    ours = Oracle(model).logits(ids, np.arange(40), causal(40))
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


def test_oracle_sees_positions_and_mask():
    oracle, ids = oracle_of("llama"), np.arange(10, 30)
    base = oracle.logits(ids, np.arange(20), causal(20))[-1]
    shifted = oracle.logits(ids, np.arange(20) + np.r_[np.zeros(10), np.full(10, 3)],
                            causal(20))[-1]
    holes = causal(20)
    holes[-1, 5] = False
    assert np.abs(base - shifted).max() > 0.1
    assert np.abs(base - oracle.logits(ids, np.arange(20), holes)[-1]).max() > 0.1


# ---------------------------------------------------------------- decoder vs oracle


def check_against_oracle(oracle, records, layout, target_start) -> int:
    """Rebuild the cache slots from the decoder's reported chunks and compare every logit
    it sampled from with the oracle's. Returns the number of logits checked."""
    mask_layout = "interleaved" if layout == "reencode" else layout
    tokens: list[int] = []
    is_target: list[bool] = []
    start = None if target_start == "auto" else target_start
    checked = 0
    for r in records:
        chunk = np.array(r.tokens).reshape(-1).tolist()
        del tokens[r.start:], is_target[r.start:]
        if r.kind == TARGET and start is None:
            start = len(is_target) - sum(is_target)  # "auto": source slots at first target
        tokens += chunk
        is_target += [r.kind == TARGET] * len(chunk)
        positions = layout_positions(is_target, mask_layout, start or 0)
        assert r.positions == tuple(positions[-len(chunk):])
        if r.logits is None:
            continue
        expected = oracle.logits(tokens, positions, layout_mask(is_target, mask_layout))[-1]
        np.testing.assert_allclose(np.array(r.logits), expected, atol=ATOL, rtol=0)
        checked += 1
    return checked


@cache
def frequent_tokens(arch: str) -> tuple[int, ...]:
    """Tokens the tiny model writes: declared EOS in some examples, so that dropped-EOS
    paths run on a real forward too."""
    trace = translate(model_of(arch), tok(), SENTENCE, k=2, max_new_words=10)
    return tuple(sorted(set(target_tokens(trace))))


def check_prefilled_against_oracle(oracle, records, target_start) -> int:
    """The prefilled engine: the first chunk is the whole source; every target chunk's
    query q of row r saw ``visible`` source tokens (the chunk's earlier queries: row 0's
    budget) and every earlier target slot, whose entries saw the budgets in ``context``.
    Each row's logits must be the oracle's for that row's budgets."""
    first, *rest = records
    assert first.kind == SOURCE and first.start == 0 and first.visible is None
    source = np.array(first.tokens).reshape(-1).tolist()
    target: list[int] = []
    start = None if target_start == "auto" else target_start
    checked = 0
    for r in rest:
        assert r.kind == TARGET and r.visible is not None and r.context is not None
        chunk = np.array(r.tokens).reshape(-1).tolist()
        del target[r.start - len(source):]
        assert len(r.context) == len(target)
        target += chunk
        if start is None:
            start = r.visible[0]  # "auto": the budget of the first target token
        logits = np.array(r.logits).reshape(len(r.visible), -1)
        for row, budget in enumerate(r.visible):
            budgets = [*r.context, *[r.visible[0]] * (len(chunk) - 1), budget]
            mask = budget_mask(len(source), budgets)
            positions = [*range(len(source)), *range(start, start + len(target))]
            expected = oracle.logits(source + target, positions, mask)[-1]
            np.testing.assert_allclose(logits[row], expected, atol=ATOL, rtol=0)
            checked += 1
    return checked


def explicit(arch="llama", k=1, layout="group", target_start="auto", max_tokens_per_word=50,
             eos_pick=None, stop_at_first_eos=False, script=None, engine="incremental"):
    """A fixed example: the cases a random draw might miss are always run."""
    return example(arch=arch, words=SENTENCE[:6], k=k, layout=layout,
                   target_start=target_start, max_tokens_per_word=max_tokens_per_word,
                   eos_pick=eos_pick, stop_at_first_eos=stop_at_first_eos, script=script,
                   engine=engine)


@settings(max_examples=16, deadline=None)
@explicit()
@explicit(engine="prefilled")
@explicit(arch="qwen2", k=2, target_start=0, max_tokens_per_word=2)
@explicit(arch="qwen2", k=2, target_start=0, max_tokens_per_word=2, engine="prefilled")
@explicit(layout="interleaved", eos_pick=3)
@explicit(eos_pick=3, engine="prefilled")
@explicit(arch="qwen2", layout="reencode", k=2)
@explicit(script=[1, 1, 1, 3], eos_pick=5)
@explicit(script=[1, 3, 3, 6], eos_pick=5, engine="prefilled")
@explicit(engine="fused", eos_pick=3)
@explicit(arch="qwen2", k=2, target_start=0, max_tokens_per_word=2, engine="fused")
@explicit(script=[1, 3, 3, 6], eos_pick=5, engine="fused")
@given(arch=st.sampled_from(["llama", "qwen2"]),
       words=st.lists(st.sampled_from(POOL), min_size=1, max_size=7),
       k=st.integers(1, 5), layout=st.sampled_from(LAYOUTS),
       target_start=st.sampled_from(["auto", "auto", 0, 7]),
       max_tokens_per_word=st.sampled_from([1, 2, 50]),
       eos_pick=st.none() | st.integers(0, 1000), stop_at_first_eos=st.booleans(),
       script=st.none() | st.lists(st.integers(1, 4), min_size=1, max_size=6).map(sorted),
       engine=st.sampled_from(["incremental", "prefilled", "fused"]))
def test_every_sampled_logit_matches_the_oracle(arch, words, k, layout, target_start,
                                                 max_tokens_per_word, eos_pick,
                                                 stop_at_first_eos, script, engine):
    if layout != "group":
        target_start, engine = "auto", "auto"
    tokenizer = tok()
    if eos_pick is not None:
        common = frequent_tokens(arch)
        tokenizer = with_eos(tokenizer, common[eos_pick % len(common)])
    records = []
    live = engine == "fused"  # a stream: the fused engine's source

    def run(engine, on_forward=None):
        return translate(model_of(arch), tokenizer, iter(words) if live else words, k=k,
                         layout=layout, target_start=target_start,
                         max_tokens_per_word=max_tokens_per_word, max_new_words=6,
                         stop_at_first_eos=stop_at_first_eos,
                         policy=None if script is None else Scripted(script), engine=engine,
                         on_forward=on_forward)

    trace = run(engine, records.append)
    if engine == "prefilled":
        assert check_prefilled_against_oracle(oracle_of(arch), records, target_start) >= 1
    else:
        assert check_against_oracle(oracle_of(arch), records, layout, target_start) >= 1
        check_slots(records, trace, tokenizer)
    if engine in ("prefilled", "fused"):
        assert trace.settings.option("engine") == engine
        # ... and what it fed is what the twin feeds: the same trace.
        assert untimed(trace) == untimed(run("incremental"))
    # A fused read: its source chunk, then its target token.
    for before, r in zip(records, records[1:], strict=False):
        assert not r.fused or (before.kind == SOURCE and r.start == before.start
                               + np.array(before.tokens).size)
    assert trace.finish_reason is not None


def check_one_forward_per_token(records, twin_records, trace, tokenizer) -> bool:
    """The prefilled engine's forwards: one for the source and the header, then one per
    target token fed (the written ones, and whitespace-only ones a run may end with).
    Returns False (checking only that the twin makes no more) where an EOS is dropped
    right after a read: the token that read gave was fed ahead (row 1's, an EOS), and the
    run goes on with a re-feed, as the twin's does."""
    calls = sum(1 for r in records if not r.fused)
    assert calls <= len(twin_records)
    events = [type(e) for e in trace.events]
    if any((a, b) == (Read, DroppedEos) for a, b in zip(events, events[1:], strict=False)):
        return False
    source = np.array(records[0].tokens).size
    target: list[int] = []
    for r in records[1:]:
        assert r.kind == TARGET
        del target[r.start - source:]
        target += np.array(r.tokens).reshape(-1).tolist()
    header = list(template_for(tokenizer, system=DEFAULT_SYSTEM).header_ids)
    written = [t for e in trace.events if isinstance(e, (Write, BlankRun))
               for t in e.token_ids]
    assert target[: len(header)] == header
    fed = target[len(header):]
    assert fed[: len(written)] == written
    table = token_table(tokenizer)
    assert not any(table.has_content(t) for t in fed[len(written):])
    assert calls == 1 + len(fed)
    return True


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("k, eos_pick", [(1, None), (2, None), (3, None), (2, 4), (1, 9),
                                         (2, 7)])
def test_the_prefilled_engine_makes_one_forward_per_token_fed(arch, k, eos_pick):
    """Greedy wait-k over a known source: no forward for the header, no re-feed after a
    read (a dropped EOS included), and the step fed ahead for the token that ends the
    run is never computed. A wrong forecast, a lost alternative row or a wasted last step
    shows here."""
    tokenizer = tok()
    if eos_pick is not None:
        common = frequent_tokens(arch)
        tokenizer = with_eos(tokenizer, common[eos_pick % len(common)])
    records, twin_records = [], []
    trace = translate(model_of(arch), tokenizer, SENTENCE, k=k, max_new_words=9,
                      engine="prefilled", on_forward=records.append)
    twin = translate(model_of(arch), tokenizer, SENTENCE, k=k, max_new_words=9,
                     engine="incremental", on_forward=twin_records.append)
    assert untimed(trace) == untimed(twin)
    exact = check_one_forward_per_token(records, twin_records, trace, tokenizer)
    assert exact or eos_pick is not None


@settings(max_examples=60, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2"]),
       words=st.lists(st.sampled_from(POOL), min_size=1, max_size=8),
       k=st.integers(1, 5), max_tokens_per_word=st.sampled_from([1, 2, 3, 50]),
       eos_pick=st.none() | st.integers(0, 1000), stop_at_first_eos=st.booleans(),
       target_start=st.sampled_from(["auto", 0, 7]), max_new_words=st.integers(1, 10))
def test_prefilled_forwards_over_random_runs(arch, words, k, max_tokens_per_word, eos_pick,
                                             stop_at_first_eos, target_start, max_new_words):
    """The same count over random sources, word cuts, EOS, limits and target starts, with
    the twin's trace."""
    tokenizer = tok()
    if eos_pick is not None:
        common = frequent_tokens(arch)
        tokenizer = with_eos(tokenizer, common[eos_pick % len(common)])
    options = dict(k=k, max_tokens_per_word=max_tokens_per_word, target_start=target_start,
                   stop_at_first_eos=stop_at_first_eos, max_new_words=max_new_words)
    records, twin_records = [], []
    trace = translate(model_of(arch), tokenizer, words, engine="prefilled",
                      on_forward=records.append, **options)
    twin = translate(model_of(arch), tokenizer, words, engine="incremental",
                     on_forward=twin_records.append, **options)
    assert untimed(trace) == untimed(twin)
    check_one_forward_per_token(records, twin_records, trace, tokenizer)


def test_a_model_without_row_masks_runs_prefilled_in_one_row():
    """gemma2 reshapes its queries per KV head group, which a (rows, 1, q, k) mask does
    not fit: the prefilled engine feeds one row and re-feeds after a read, and writes the
    twin's trace."""
    model = tiny_gemma2()
    mx.eval(model.parameters())
    records = []
    trace = translate(model, tok(), SENTENCE, k=1, max_new_words=6, engine="prefilled",
                      on_forward=records.append)
    assert all(np.array(r.tokens).ndim == 1 for r in records)
    assert all(r.visible is None or len(r.visible) == 1 for r in records)
    assert untimed(trace) == untimed(translate(model, tok(), SENTENCE, k=1, max_new_words=6,
                                               engine="incremental"))


def check_slots(records, trace, tokenizer):
    """What the cache holds is what the trace says: source slots are the prefix and the
    words read, in order; target slots are the header and the written tokens, in order.
    Exceptions: the chunk of a speculative feed (it may yet be dropped) and, past the
    written tokens, whitespace-only tokens (a trailing whitespace "word" is not written).
    A skipped trim or a token fed twice shows here, not in the logits."""
    template = template_for(tokenizer, system=DEFAULT_SYSTEM)
    table = token_table(tokenizer)
    source = list(template.prefix_ids) + [t for e in trace.events
                                          if isinstance(e, (Read, SourceEnd))
                                          for t in e.token_ids]
    # Blank runs (whitespace-only runs cut at max_tokens_per_word) stay in the cache too.
    target = list(template.header_ids) + [t for e in trace.events
                                          if isinstance(e, (Write, BlankRun))
                                          for t in e.token_ids]
    tokens, is_target = [], []
    for r in records:
        chunk = np.array(r.tokens).reshape(-1).tolist()
        del tokens[r.start:], is_target[r.start:]
        tokens += chunk
        is_target += [r.kind == TARGET] * len(chunk)
        ours_source = [t for t, flag in zip(tokens, is_target, strict=True) if not flag]
        ours_target = [t for t, flag in zip(tokens, is_target, strict=True) if flag]
        assert ours_source == source[: len(ours_source)]
        settled = ours_target[: len(ours_target) - len(chunk)] if r.speculative else ours_target
        assert settled[: len(target)] == target[: len(settled)]
        assert not any(table.has_content(t) for t in settled[len(target):])


# ---------------------------------------------------------------- group source cache


def source_prefill(model, tokenizer, trace):
    ids = list(template_for(tokenizer, system=DEFAULT_SYSTEM).prefix_ids)
    for read in trace.reads:
        ids += read.token_ids
    cache = make_prompt_cache(model)
    model(mx.array(ids)[None], cache=cache)
    return cache, len(ids)


def run_keeping_cache(model, words, **kw):
    run = decoder._make_run(model, tok(), words, DecodeConfig(engine="incremental", **kw))
    events = list(run.events())
    return run, events


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_group_source_cache_is_a_one_shot_prefill(arch, k):
    model = model_of(arch)
    run, events = run_keeping_cache(model, SENTENCE, k=k, layout="group", max_new_words=9)
    from simulref.trace import Settings, Trace

    trace = Trace(Settings(model="tiny", k=k, layout="group", system=DEFAULT_SYSTEM),
                  SENTENCE, events)
    assert len(trace.writes) >= 3  # targets were written between reads
    reference, n_source = source_prefill(model, tok(), trace)
    is_target = run.shared.slot_is_target()
    assert (~is_target).sum() == n_source
    for ours, ref in zip(run.caches, reference, strict=True):
        for mine, theirs in ((ours.keys, ref.keys), (ours.values, ref.values)):
            source_part = np.array(mine[..., : ours.length, :])[:, :, ~is_target]
            np.testing.assert_allclose(source_part, np.array(theirs[..., :n_source, :]),
                                       atol=1e-4, rtol=0)


def test_interleaved_source_cache_is_not_a_prefill():
    """The twin of the test above: interleaving changes what the source part holds."""
    model = model_of("llama")
    run, events = run_keeping_cache(model, SENTENCE, k=1, layout="interleaved",
                                    max_new_words=9)
    from simulref.trace import Settings, Trace

    trace = Trace(Settings(model="tiny", k=1, layout="interleaved", system=DEFAULT_SYSTEM),
                  SENTENCE, events)
    reference, n_source = source_prefill(model, tok(), trace)
    is_target = run.shared.slot_is_target()
    last = run.caches[-1]
    source_part = np.array(last.keys[..., : last.length, :])[:, :, ~is_target]
    assert np.abs(source_part - np.array(reference[-1].keys[..., :n_source, :])).max() > 1e-2


# ---------------------------------------------------------------- offline equivalence


def offline_tokens(model, tokenizer, words, n: int) -> list[int]:
    from mlx_lm import stream_generate

    prompt = assemble(tokenizer, words, system=DEFAULT_SYSTEM)
    ids = list(prompt.ids) + list(prompt.header_ids)
    return [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=n)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reading_everything_first_equals_mlx_lm_generate(arch, layout):
    model = model_of(arch)
    reference = offline_tokens(model, tok(), SENTENCE, 80)
    for policy in (WaitK(len(SENTENCE)), WaitK(len(SENTENCE) + 3), ReadAll()):
        trace = translate(model, tok(), SENTENCE, layout=layout, policy=policy,
                          max_new_words=12)
        ours = target_tokens(trace)
        assert len(ours) >= 5
        assert ours == reference[: len(ours)]
        assert_ends_like(trace, reference, 12)


def assert_ends_like(trace, reference, max_new_words):
    """Either the word limit was hit, or the reference ends where we stopped: EOS, after
    at most some whitespace-only tokens (a trailing whitespace 'word' is not written)."""
    if trace.finish_reason == "max_new_words":
        assert len(trace.writes) == max_new_words
        return
    assert trace.finish_reason == "eos"
    rest = reference[len(target_tokens(trace)):]
    assert rest[-1] in tok().eos_token_ids
    assert not any(token_table(tok()).content[t] for t in rest[:-1])


def test_layouts_part_ways_at_small_k_and_why():
    """At k=1 the first target word is the same in every layout (same cache so far).
    Then the second source word is read after target tokens: the group layout gives it
    the next source positions and hides the targets from it; interleaved places it after
    the targets and lets it see them; reencode rebuilds source-then-target, so the target
    tokens move to later positions. The outputs then differ."""
    model = model_of("llama")
    records = {layout: [] for layout in LAYOUTS}
    traces = {layout: translate(model, tok(), SENTENCE, k=1, layout=layout, max_new_words=8,
                                engine="incremental" if layout == "group" else "auto",
                                on_forward=records[layout].append) for layout in LAYOUTS}
    first = {tuple(t.writes[0].token_ids) for t in traces.values()}
    assert len(first) == 1

    def second_read(layout):
        seen_target = False
        for r in records[layout]:
            seen_target |= r.kind == TARGET
            if seen_target and r.kind == SOURCE:
                return r

    prefix_and_word0 = len(template_for(tok(), system=DEFAULT_SYSTEM).prefix_ids) + len(
        traces["group"].reads[0].token_ids)
    group, inter = second_read("group"), second_read("interleaved")
    assert group.positions[0] == prefix_and_word0  # next source position
    assert inter.positions[0] == inter.start > prefix_and_word0  # after the targets
    rebuild = second_read("reencode")
    assert rebuild.start == 0 and rebuild.positions[0] == 0
    assert target_tokens(traces["group"]) != target_tokens(traces["interleaved"])
    assert target_tokens(traces["group"]) != target_tokens(traces["reencode"])


def test_target_start_zero_differs_from_auto():
    model = model_of("qwen2")
    auto = translate(model, tok(), SENTENCE, k=len(SENTENCE), max_new_words=6)
    zero = translate(model, tok(), SENTENCE, k=len(SENTENCE), max_new_words=6,
                     target_start=0)
    assert target_tokens(auto) != target_tokens(zero)


# ---------------------------------------------------------------- other architectures


def tiny_qwen3():
    from mlx_lm.models import qwen3

    args = qwen3.ModelArgs(model_type="qwen3", hidden_size=64, num_hidden_layers=2,
                           intermediate_size=128, num_attention_heads=4, rms_norm_eps=1e-6,
                           vocab_size=512, num_key_value_heads=2, max_position_embeddings=512,
                           head_dim=16, tie_word_embeddings=True, rope_theta=10000.0)
    mx.random.seed(5)
    return qwen3.Model(args)


def tiny_gemma2():
    from mlx_lm.models import gemma2

    args = gemma2.ModelArgs(model_type="gemma2", hidden_size=64, num_hidden_layers=2,
                            intermediate_size=128, num_attention_heads=4, head_dim=16,
                            rms_norm_eps=1e-6, vocab_size=512, num_key_value_heads=2,
                            query_pre_attn_scalar=16.0)
    mx.random.seed(6)
    return gemma2.Model(args)


@pytest.mark.parametrize("make", [tiny_qwen3, tiny_gemma2], ids=["qwen3", "gemma2"])
def test_other_plain_kv_architectures_work(make):
    model = make()
    mx.eval(model.parameters())
    reference = offline_tokens(model, tok(), SENTENCE, 60)
    trace = translate(model, tok(), SENTENCE, k=len(SENTENCE), max_new_words=8)
    assert target_tokens(trace) == reference[: len(target_tokens(trace))]
    assert_ends_like(trace, reference, 8)
    run, events = run_keeping_cache(model, SENTENCE, k=1, layout="group", max_new_words=6)
    assert any(isinstance(e, Write) for e in events)


def test_gemma3_sliding_window_is_refused():
    from mlx_lm.models import gemma3_text

    args = gemma3_text.ModelArgs(model_type="gemma3_text", hidden_size=32, num_hidden_layers=2,
                                 intermediate_size=64, num_attention_heads=2, head_dim=16,
                                 vocab_size=512, num_key_value_heads=1, sliding_window=8,
                                 sliding_window_pattern=2)
    with pytest.raises(ValueError, match="RotatingKVCache"):
        translate(gemma3_text.Model(args), tok(), SENTENCE)


# ---------------------------------------------------------------- a scripted model


def word_openers():
    table = token_table(tok())
    return [i for i in range(len(tok())) if table.starts[i] and table.content[i]]


def continuations():
    table = token_table(tok())
    return [i for i in range(3, len(tok())) if not table.starts[i] and table.content[i]]


HEADER_LAST = template_for(tok(), system=DEFAULT_SYSTEM).header_ids[-1]
EOS = 2


def scripted_words(n_words: int, multi_every: int = 3, extra: int = 1):
    """Word i: an opener, plus ``extra`` continuation tokens every ``multi_every``-th word."""
    openers, conts = iter(word_openers()), iter(continuations())
    return [[next(openers)] + ([next(conts) for _ in range(extra)]
                               if i % multi_every == 1 else [])
            for i in range(n_words)]


def scripted_model(words, end: int = EOS, first_from: int = HEADER_LAST):
    chain = [first_from] + [t for w in words for t in w] + [end]
    return successor_model(len(tok()), dict(zip(chain, chain[1:], strict=False)), default=end)


def test_schedule_is_min_k_plus_i_n_for_every_small_n_and_k():
    fmt = template_for(tok(), system=DEFAULT_SYSTEM).chat_format
    for n in range(0, 31):
        source = [POOL[i % len(POOL)] for i in range(n)]
        for k in range(1, n + 3):
            # Enough words to write past the end of the source (min(k + i, N) = N).
            words = scripted_words(max(2, n - k + 3))
            trace = translate(scripted_model(words), tok(), source, k=k, chat_format=fmt)
            if n == 0:
                assert trace.events == (Finish(decoder.EMPTY_SOURCE, trace.events[0].t),)
                continue
            assert trace.delays == tuple(min(k + i, n) for i in range(len(words))), (n, k)
            assert [list(w.token_ids) for w in trace.writes] == words
            assert trace.finish_reason == "eos"


def test_scripted_policy_and_writes_text():
    words = scripted_words(6)
    trace = translate(scripted_model(words), tok(), SENTENCE[:5], policy=Scripted([2, 2, 4]))
    assert trace.delays == (2, 2, 4, 5, 5, 5)
    for w in trace.writes:
        assert w.text == tok().decode(list(w.token_ids))
        assert w.word and w.text[0].isspace()  # every scripted word opens with a space


def test_early_eos_is_dropped_and_reading_goes_on():
    words = scripted_words(3)
    trace = translate(scripted_model(words), tok(), SENTENCE[:7], k=1)
    assert [list(w.token_ids) for w in trace.writes] == words
    assert trace.delays == (1, 2, 3)
    dropped = [e.source_index for e in trace.events if isinstance(e, DroppedEos)]
    assert dropped == [2, 3, 4, 5]  # after words 3..6 read; the 7th completes the source
    assert trace.finish_reason == "eos"
    kinds = [type(e).__name__ for e in trace.events]
    assert kinds[-3:] == ["DroppedEos", "Read", "Finish"]


def test_stop_at_first_eos_stops_early():
    words = scripted_words(3)
    trace = translate(scripted_model(words), tok(), SENTENCE[:7], k=1, stop_at_first_eos=True)
    assert trace.delays == (1, 2, 3) and trace.finish_reason == "early_eos"
    # |X| stays the whole known source, not just the words read before stopping.
    assert trace.source_words == tuple(SENTENCE[:7])
    assert not any(isinstance(e, DroppedEos) for e in trace.events)


def test_eos_right_after_the_header_reads_the_whole_source():
    trace = translate(scripted_model([]), tok(), SENTENCE[:4], k=2)
    assert trace.writes == () and trace.finish_reason == "eos"
    assert len(trace.reads) == 4
    assert [e.source_index for e in trace.events if isinstance(e, DroppedEos)] == [1, 2]


def test_long_words_are_cut_and_resume():
    words = scripted_words(4, multi_every=2, extra=4)  # words 1 and 3 have 5 tokens
    model = scripted_model(words)
    trace = translate(model, tok(), SENTENCE[:8], k=1, max_tokens_per_word=3)
    text = tok().decode([t for w in words for t in w])
    assert "".join(w.text for w in trace.writes) == text
    assert [len(w.token_ids) for w in trace.writes] == [1, 3, 2, 1, 3, 2]
    done = translate(model, tok(), SENTENCE[:2], k=1, max_tokens_per_word=3)
    assert done.finish_reason == "max_tokens_per_word"
    assert [len(w.token_ids) for w in done.writes] == [1, 3]


def test_max_new_words_stops():
    words = scripted_words(10)
    trace = translate(scripted_model(words), tok(), SENTENCE[:3], k=1, max_new_words=4)
    assert len(trace.writes) == 4 and trace.finish_reason == "max_new_words"
    runaway = scripted_model([], end=word_openers()[0], first_from=HEADER_LAST)
    guard = translate(runaway, tok(), SENTENCE[:3], k=1)
    assert len(guard.writes) == 2 * 3 + 10 and guard.finish_reason == "max_new_words"


def test_the_last_read_carries_the_suffix():
    trace = translate(scripted_model(scripted_words(5)), tok(), SENTENCE[:4], k=2)
    template = template_for(tok(), system=DEFAULT_SYSTEM)
    for read in trace.reads:
        assert read.token_ids == template.word_ids(read.source_index, read.word) + (
            template.suffix_ids if read.source_index == 3 else ())


# ---------------------------------------------------------------- streamed sources


@pytest.mark.parametrize("engine", ["incremental", "fused"])
def test_a_streamed_source_is_read_as_it_comes_and_never_written_early(engine):
    """No look-ahead: word j is taken from the stream when the policy wants it, and read
    at once (so j words are read when it is pulled); the end of the stream is a SourceEnd
    carrying the suffix (the last Read has none)."""
    model = model_of("llama")
    template = template_for(tok(), system=DEFAULT_SYSTEM)
    pulled = []
    events = []

    def words():
        for w in SENTENCE:
            reads = sum(isinstance(e, Read) for e in events)
            writes = sum(isinstance(e, Write) for e in events)
            assert reads == len(pulled)  # every word pulled so far was read at once
            assert writes <= max(0, len(pulled) - 2)  # wait-3: j - 2 words before word j
            pulled.append(w)
            yield w

    for event in stream(model, tok(), words(), k=3, max_new_words=12, engine=engine):
        events.append(event)
    reads = [e for e in events if isinstance(e, Read)]
    ends = [j for j, e in enumerate(events) if isinstance(e, SourceEnd)]
    assert [e.word for e in reads] == SENTENCE
    assert all(e.token_ids == tuple(template.word_ids(e.source_index, e.word)) for e in reads)
    assert len(ends) == 1 and events[ends[0]] == SourceEnd(len(SENTENCE),
                                                           template.suffix_ids, events[ends[0]].t)
    assert events.index(reads[-1]) < ends[0]
    trace = translate(model, tok(), iter(SENTENCE), k=3, max_new_words=12, engine=engine)
    assert check_trace(trace) == []
    assert untimed(trace).events == tuple(replace(e, t=0.0) for e in events)


def test_a_slow_speaker_does_not_change_the_trace():
    model = model_of("qwen2")
    expected = translate(model, tok(), iter(SENTENCE[:6]), k=2, max_new_words=8)
    q: queue.Queue = queue.Queue()

    def speak():
        for w in SENTENCE[:6]:
            time.sleep(0.01)
            q.put(w)
        q.put(None)

    threading.Thread(target=speak, daemon=True).start()
    trace = translate(model, tok(), iter(q.get, None), k=2, max_new_words=8)
    assert untimed(trace) == untimed(expected)


@pytest.mark.parametrize("source", ["", [], iter(())])
def test_empty_source_reads_and_writes_nothing(source):
    trace = translate(model_of("llama"), tok(), source)
    assert trace.reads == () and trace.writes == ()
    assert trace.finish_reason == decoder.EMPTY_SOURCE


# ---------------------------------------------------------------- sampling, errors


def test_greedy_sampler_object_is_the_default_path():
    from mlx_lm.sample_utils import make_sampler

    model = model_of("llama")
    a = translate(model, tok(), SENTENCE, k=2, max_new_words=6)
    b = translate(model, tok(), SENTENCE, k=2, max_new_words=6, sampler=make_sampler(0.0))
    assert untimed(a) == untimed(b)
    mx.random.seed(11)
    c = translate(model, tok(), SENTENCE, k=2, max_new_words=6, sampler=make_sampler(1.0))
    mx.random.seed(11)
    d = translate(model, tok(), SENTENCE, k=2, max_new_words=6, sampler=make_sampler(1.0))
    assert c.without_times().events == d.without_times().events
    assert c.settings.option("sampler") == "custom"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("seed, k, eos_pick", [(11, 1, None), (12, 2, None), (13, 3, None),
                                               (14, 2, 4), (15, 1, 9)])
def test_a_seeded_sampler_gives_the_twins_trace_with_every_engine(arch, seed, k, eos_pick):
    """With a sampler the prefilled engine steps one token at a time (row 1 sampled only
    when a read uses it, in the twin's order of draws): the same seed gives the twin's
    trace, and every logit sampled from is the oracle's for its row's budgets. The fused
    engine on a live source likewise."""
    from mlx_lm.sample_utils import make_sampler

    tokenizer = tok()
    if eos_pick is not None:
        common = frequent_tokens(arch)
        tokenizer = with_eos(tokenizer, common[eos_pick % len(common)])

    model = model_of(arch)  # (built before seeding: building it draws)

    def run(engine, source, on_forward=None):
        mx.random.seed(seed)
        return translate(model, tokenizer, source, k=k, max_new_words=8,
                         sampler=make_sampler(1.5), engine=engine, on_forward=on_forward)

    twin = untimed(run("incremental", SENTENCE))
    records = []
    assert untimed(run("prefilled", SENTENCE, records.append)) == twin
    assert check_prefilled_against_oracle(oracle_of(arch), records, "auto") >= 1
    assert any(r.visible is not None and len(r.visible) == 2 for r in records)
    assert untimed(run("fused", iter(SENTENCE))).events == twin.events


@pytest.mark.parametrize("kwargs, error, match", [
    ({"k": 0}, ValueError, "k: expected an int >= 1"),
    ({"k": 1.5}, TypeError, "k: expected an int"),
    ({"layout": "chrono"}, ValueError, "layout"),
    ({"max_tokens_per_word": 0}, ValueError, "max_tokens_per_word"),
    ({"max_new_words": -1}, ValueError, "max_new_words"),
    ({"target_start": 3, "layout": "interleaved"}, ValueError, "target_start"),
    ({"target_start": "zero"}, ValueError, "target_start"),
    ({"stop_at_first_eos": "yes"}, TypeError, "stop_at_first_eos"),
    ({"sampler": 3}, TypeError, "sampler"),
    ({"policy": "wait-3"}, TypeError, "policy"),
    ({"system": ""}, ValueError, "system"),
])
def test_bad_arguments_raise_when_stream_is_called(kwargs, error, match):
    with pytest.raises(error, match=match):
        stream(model_of("llama"), tok(), SENTENCE, **kwargs)


@pytest.mark.parametrize("source, error", [(b"hello", TypeError), (42, TypeError),
                                           (["hello world"], ValueError), ([""], ValueError)])
def test_bad_sources(source, error):
    with pytest.raises(error, match="source"):
        stream(model_of("llama"), tok(), source)


def test_a_bad_word_in_a_stream_raises_when_it_is_read():
    events = stream(model_of("llama"), tok(), iter(["Hello", "two words"]), k=1)
    with pytest.raises(ValueError, match=r"source\[1\]"):
        list(events)


def test_trace_settings():
    trace = translate(model_of("llama"), tok(), SENTENCE[:3], k=2, max_new_words=2,
                      model_id="tiny-llama")
    s = trace.settings
    assert (s.model, s.k, s.layout, s.max_new_words) == ("tiny-llama", 2, "group", 2)
    assert s.option("policy") == "wait-2"
    assert trace.source_words == tuple(SENTENCE[:3])
    assert isinstance(trace.events[0], Read)


# ---------------------------------------------------------------- what the first token sees


class CountingLM(nn.Module):
    """A one-layer model that attends, through the cache protocol and the mask it is
    given, to marked keys: it writes word ``opener[s]`` where s is the number of source
    words it can see, and EOS once it sees ``n_words`` words of its own.

    So the first token of each target word tells how many source words were visible when
    it was predicted: the decoder must drop the token predicted before a read and predict
    it again after (a stale token, a skipped trim or a hidden source word all show)."""

    def __init__(self, vocab_size, source_ids, openers, n_words):
        super().__init__()
        feats = np.zeros((vocab_size, 2), dtype=np.float32)
        feats[list(source_ids), 0] = 1.0
        feats[list(openers), 1] = 1.0
        self.feats = mx.array(feats)
        self.openers = mx.array(list(openers) + [EOS] * 64)
        self.n_words = n_words
        self.vocab_size = vocab_size

    def make_cache(self):
        return [KVCache()]

    def __call__(self, inputs, cache):
        rows, n = inputs.shape
        mask = cache[0].make_mask(n, return_array=True)
        kv = self.feats[inputs][:, None]  # [rows, 1, n, 2]: one head, features as keys
        keys, _ = cache[0].update_and_fetch(kv, kv)
        if mask is None:
            visible = mx.ones((rows, keys.shape[2]))
        elif mask.ndim == 2:  # queries x keys, the same for every row
            visible = mx.broadcast_to(mask[-1], (rows, keys.shape[2])).astype(mx.float32)
        else:  # rows x 1 x queries x keys
            visible = mask[:, 0, -1].astype(mx.float32)
        counts = (visible[:, :, None] * keys[:, 0]).sum(axis=1)  # [rows, 2]
        n_source, n_target = counts[:, 0], counts[:, 1]
        following = mx.where(n_target < self.n_words,
                             self.openers[n_source.astype(mx.int32)], EOS)
        hot = mx.arange(self.vocab_size)[None] == following[:, None]
        return mx.broadcast_to(hot.astype(mx.float32)[:, None] * 20.0,
                               (rows, n, self.vocab_size))


def one_token_words():
    template = template_for(tok(), system=DEFAULT_SYSTEM)
    used = set(template.prefix_ids) | set(template.suffix_ids) | set(template.header_ids)
    out = []
    for w in ["Je", "Le", "Vous", "de", "den", "in", "is", "le", "on", "un", "f", "l", "n"]:
        ids = tok().encode(w, add_special_tokens=False) + tok().encode(" " + w,
                                                                        add_special_tokens=False)
        if len(ids) == 2 and not set(ids) & used:
            out.append((w, ids))
    return out


@pytest.mark.parametrize("layout, engine", [(layout, "auto") for layout in LAYOUTS]
                         + [("group", "incremental")])
def test_the_first_token_of_every_word_sees_the_words_read_before_it(layout, engine):
    pairs = one_token_words()
    assert len(pairs) >= 8
    source_ids = {i for _, ids in pairs for i in ids}
    template = template_for(tok(), system=DEFAULT_SYSTEM)
    used = set(template.prefix_ids) | set(template.suffix_ids) | set(template.header_ids)
    openers = [t for t in word_openers() if t not in source_ids | used][:12]
    for n in (1, 4, 8):
        source = [w for w, _ in pairs[:n]]
        for k in (1, 2, 3, n + 1):
            n_words = max(1, n - k + 2)
            model = CountingLM(len(tok()), source_ids, openers, n_words)
            trace = translate(model, tok(), source, k=k, layout=layout, engine=engine)
            delays = [min(k + i, n) for i in range(n_words)]
            assert [w.token_ids for w in trace.writes] == [(openers[d],) for d in delays]
            assert trace.delays == tuple(delays) and trace.finish_reason == "eos"


def test_a_speculatively_fed_eos_is_trimmed_with_the_token_below_it():
    """Scripted([1, 1, 1]) writes three words after one read, so the decoder feeds each
    sampled token before looking at it; the EOS after word 1 is then already in the cache
    when it is dropped, and both it and the last word token must go before the read."""
    words = scripted_words(2, multi_every=5)
    records = []
    trace = translate(scripted_model(words), tok(), SENTENCE[:4], policy=Scripted([1, 1, 1]),
                      engine="incremental", on_forward=records.append)
    assert trace.delays == (1, 1)
    assert [e.source_index for e in trace.events if isinstance(e, DroppedEos)] == [0, 1, 2]
    spec_eos = [r for r in records if r.kind == TARGET and r.tokens.size == 1
                and r.tokens.item() == EOS]
    assert spec_eos  # the EOS was fed speculatively
    check_slots(records, trace, tok())


class WriteFirst:
    """A policy that would write before reading anything."""

    name = "write-first"

    def decide(self, read, written, source_done, source_length=None):
        return WaitK(1).decide(read + 1, written, source_done)  # word i after i reads


def test_nothing_is_written_before_the_first_read():
    trace = translate(scripted_model(scripted_words(3)), tok(), SENTENCE[:3],
                      policy=WriteFirst())
    assert trace.delays == (1, 1, 2)
    assert trace.settings.k is None and trace.settings.option("policy") == "write-first"


# ---------------------------------------------------------------- word boundaries


def test_byte_level_token_table_agrees_with_decode():
    table = token_table(tok())
    for i in range(len(tok())):
        text = tok().decode([i])
        if "\ufffd" not in text:  # pieces of a multi-byte character decode alone to U+FFFD
            assert table.text([i]) == text
            assert table.opens_word(i) == text[:1].isspace()
            assert table.has_content(i) == bool(text.strip())


def spm_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", *bytes_],
                                  show_progress=False)
    bpe.train_from_iterator(["hello world, the weather is nice", "bonjour le monde"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")


def test_sentencepiece_token_table_keeps_leading_spaces_and_bytes():
    spm = spm_tokenizer()
    table = token_table(spm)
    ids = spm.encode("hello world\nok é", add_special_tokens=False)
    # The SentencePiece decoder strips the first space; the table keeps it (a word's text).
    assert table.text(ids) == " hello world\nok é"
    words = "".join("|" + spm.convert_ids_to_tokens(i) if table.opens_word(i)
                    else spm.convert_ids_to_tokens(i) for i in ids)
    assert words.split("|")[1:] == ["\u2581hello", "\u2581world", "<0x0A>o<0x6B>",
                                    "\u2581<0xC3><0xA9>"]


# ---------------------------------------------------------------- the context limit


def short_context_model(context: int):
    model = tiny_model("llama")
    model.args.max_position_embeddings = context
    return model


def full_prompt(words) -> int:
    template = template_for(tok(), system=DEFAULT_SYSTEM)
    prompt = assemble(tok(), list(words), system=DEFAULT_SYSTEM)
    return len(prompt.ids) + len(template.header_ids)


@pytest.mark.parametrize("live, engines", [(False, ("incremental", "prefilled")),
                                           (True, ("incremental", "fused"))])
def test_a_run_that_reaches_the_context_limit_ends_with_its_own_finish(live, engines):
    """The next token or read would not fit: the run ends with "context_limit", the trace
    kept (valid, every engine the same), and no forward ever went past the context."""
    context = full_prompt(SENTENCE) + 4
    model = short_context_model(context)
    traces = {}
    for engine in engines:
        records = []
        traces[engine] = translate(model, tok(), iter(SENTENCE) if live else SENTENCE, k=2,
                                   max_new_words=40, engine=engine, on_forward=records.append)
        if engine == "incremental":  # its slots are the sequence itself
            assert max(r.start + np.array(r.tokens).size for r in records) <= context
    trace = traces["incremental"]
    assert trace.finish_reason == "context_limit"
    assert trace.writes and check_trace(trace) == []
    assert untimed(traces[engines[1]]) == untimed(trace)
    assert trace.settings.option("engine") == "incremental"


def test_a_known_source_longer_than_the_context_is_read_as_far_as_it_fits():
    model = short_context_model(full_prompt(SENTENCE) - 6)
    trace = translate(model, tok(), SENTENCE, k=2, max_new_words=40)  # auto: incremental
    assert trace.settings.option("engine") == "incremental"
    assert trace.finish_reason == "context_limit" and len(trace.reads) < len(SENTENCE)
    assert check_trace(trace) == []
    with pytest.raises(ValueError, match="'prefilled' needs the whole prompt"):
        translate(model, tok(), SENTENCE, k=2, engine="prefilled")
