"""Batched decoding (simulref.batch) against its slow twin: every sentence's trace from
``translate_batch`` equals ``translate``'s, one at a time, whatever the batch (sizes,
lengths, refills, k, layouts, EOS positions, limits); and the batch buffer's bookkeeping
(splice, compaction, shrinking) on its own."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decoder import (
    POOL,
    SENTENCE,
    frequent_tokens,
    full_prompt,
    model_of,
    short_context_model,
    tok,
    with_eos,
)
from traces import untimed

from simulref import batch as batching
from simulref.batch import Item, decode_items, translate_batch
from simulref.batch_cache import EMPTY, SOURCE, TARGET, BatchBuffer
from simulref.config import DecodeConfig
from simulref.decoder import Feed, translate
from simulref.policy import ReadAll, Scripted
from simulref.testing import successor_model
from simulref.trace import DroppedEos
from simulref.verify import check_trace

sentences = st.lists(st.lists(st.sampled_from(POOL), min_size=0, max_size=8), min_size=1,
                     max_size=7)


def one_at_a_time(model, tokenizer, sources, **options):
    return [untimed(translate(model, tokenizer, s, **options)) for s in sources]


def batched(model, tokenizer, sources, batch_size, **options):
    traces = translate_batch(model, tokenizer, sources, batch_size=batch_size, **options)
    assert all(t.settings.option("engine") == "batched" for t in traces
               if t.settings.layout != "reencode")
    return [untimed(t) for t in traces]


@settings(max_examples=40, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2"]), sources=sentences,
       batch_size=st.integers(1, 4), k=st.integers(1, 4),
       layout=st.sampled_from(["group", "interleaved"]),
       target_start=st.sampled_from(["auto", "auto", 0, 5]),
       max_tokens_per_word=st.sampled_from([1, 2, 50]),
       eos_pick=st.none() | st.integers(0, 1000), stop_at_first_eos=st.booleans())
def test_every_sentence_of_a_batch_gets_the_trace_translate_gives(
        arch, sources, batch_size, k, layout, target_start, max_tokens_per_word, eos_pick,
        stop_at_first_eos):
    if layout != "group":
        target_start = "auto"
    tokenizer = tok()
    if eos_pick is not None:  # a token the model writes is EOS: early EOS mid-sentence
        common = frequent_tokens(arch)
        tokenizer = with_eos(tokenizer, common[eos_pick % len(common)])
    options = dict(k=k, layout=layout, target_start=target_start,
                   max_tokens_per_word=max_tokens_per_word, max_new_words=6,
                   stop_at_first_eos=stop_at_first_eos)
    model = model_of(arch)
    assert batched(model, tokenizer, sources, batch_size, **options) == one_at_a_time(
        model, tokenizer, sources, **options)


def test_rows_with_different_configs_share_a_batch():
    """k, layout, system and policy differ from row to row (an eval's runs in one batch)."""
    model = model_of("llama")
    configs = [DecodeConfig(k=1), DecodeConfig(k=3, layout="interleaved"),
               DecodeConfig(k=2, system="Translate to German"),
               DecodeConfig(policy=ReadAll()), DecodeConfig(policy=Scripted([1, 1, 4])),
               DecodeConfig(k=2, layout="reencode")]  # not batchable: decoded alone
    sources = [" ".join(SENTENCE[: 3 + i]) for i in range(len(configs))]
    items = [Item(("run", i), s, c) for i, (s, c) in enumerate(zip(sources, configs, strict=False))]
    done = {f.key: f for f in decode_items(model, tok(), items * 2, batch_size=3)
            if isinstance(f, batching.Finished)}
    for i, (source, config) in enumerate(zip(sources, configs, strict=False)):
        expected = untimed(translate(model, tok(), source, config))
        assert untimed(done[("run", i)].trace) == expected, config


def test_scripted_model_eos_and_limits():
    """The scripted model predicts the successor of the last token fed: EOS after chosen
    tokens, long words cut, the words limit."""
    tokenizer = tok()
    vocab = len(tokenizer.get_vocab())
    eos = tokenizer.eos_token_id
    common = frequent_tokens("llama")
    script = {common[0]: common[1], common[1]: eos, common[2]: common[2]}
    model = successor_model(vocab, script, default=common[0])
    sources = [" ".join(POOL[i : i + n]) for i, n in enumerate([1, 4, 7, 2, 9, 3])]
    for options in (dict(k=1), dict(k=2, stop_at_first_eos=True),
                    dict(k=3, max_tokens_per_word=1), dict(k=1, max_new_words=2),
                    dict(k=2, layout="interleaved")):
        one = one_at_a_time(model, tokenizer, sources, **options)
        assert batched(model, tokenizer, sources, 4, **options) == one, options
    assert any(isinstance(e, DroppedEos) for t in one for e in t.events)


def test_a_prompt_longer_than_the_context_is_decoded_alone():
    model = short_context_model(full_prompt(SENTENCE) - 6)
    sources = [SENTENCE, SENTENCE[:3], SENTENCE[:4]]
    out = translate_batch(model, tok(), sources, k=2, max_new_words=40, batch_size=2)
    assert out[0].finish_reason == "context_limit" and check_trace(out[0]) == []
    assert [untimed(t) for t in out] == one_at_a_time(model, tok(), sources, k=2,
                                                      max_new_words=40)


def test_compaction_refills_and_shrinking_keep_the_traces(monkeypatch):
    """Compact at every chance (the buffer moves all the time): same traces."""
    compact = BatchBuffer.compact
    moved = []

    def eager(self, at_least=64):
        n = compact(self, at_least=1)
        moved.append(n)
        return n

    monkeypatch.setattr(BatchBuffer, "compact", eager)
    model = model_of("qwen2")
    sources = [POOL[i : i + 2 + (5 * i) % 9] for i in range(10)]
    options = dict(k=2, max_new_words=8)
    assert batched(model, tok(), sources, 3, **options) == one_at_a_time(
        model, tok(), sources, **options)
    assert sum(moved) > 0


def test_a_wrong_budget_is_caught():
    """The equivalence fails when a row's queries see one source token too many."""
    model = model_of("llama")
    sources = [SENTENCE, SENTENCE[2:], SENTENCE[:5]]
    expected = one_at_a_time(model, tok(), sources, k=1, max_new_words=8)
    budget = batching._Row.budget

    class Leaky(batching._Row):
        @property
        def budget(self):
            return min(budget.fget(self) + 1, self.ends[-1])

    original = batching._Row
    try:
        batching._Row = Leaky
        assert batched(model, tok(), sources, 2, k=1, max_new_words=8) != expected
    finally:
        batching._Row = original


def test_events_stream_per_sentence_in_order():
    model = model_of("llama")
    sources = [SENTENCE[:4], SENTENCE[:6], SENTENCE[:2]]
    events: dict[int, list] = {}
    for index, event in batching.stream_batch(model, tok(), sources, k=2, batch_size=2):
        events.setdefault(index, []).append(event)
    for index, source in enumerate(sources):
        trace = translate(model, tok(), source, k=2)
        assert [replace(e, t=0.0) for e in events[index]] == [
            replace(e, t=0.0) for e in trace.events]


@pytest.mark.parametrize("sources, error, match", [
    ("one sentence", TypeError, "sources: expected a sequence"),
    ([Feed()], TypeError, r"sources\[0\]: expected a str"),
    ([iter(["a"])], TypeError, r"sources\[0\]"),
])
def test_bad_sources(sources, error, match):
    with pytest.raises(error, match=match):
        translate_batch(model_of("llama"), tok(), sources)


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_bad_batch_size(size):
    with pytest.raises((ValueError, TypeError), match="batch_size"):
        translate_batch(model_of("llama"), tok(), ["a b"], batch_size=size)


def test_empty_sources_give_no_traces_and_empty_sentences_their_own():
    assert translate_batch(model_of("llama"), tok(), []) == []
    out = translate_batch(model_of("llama"), tok(), ["", "a b c"], k=1)
    assert out[0].finish_reason == "empty_source" and out[1].writes


# ---------------------------------------------------------------- the buffer itself


def filled(rows: int, kinds, interleaved=False):
    """A buffer of one layer whose keys are the column number + 1 in every row."""
    buffer = BatchBuffer(1, rows)
    buffer.state.interleaved[:] = interleaved
    kinds = np.broadcast_to(np.asarray(kinds, np.int8), (rows, len(kinds[0]))).copy()
    n = kinds.shape[1]
    buffer.state.begin(kinds, np.zeros_like(kinds, np.int32), np.full(kinds.shape, 99),
                       np.zeros(rows))
    keys = mx.broadcast_to(mx.arange(1, n + 1, dtype=mx.float32)[None, None, :, None],
                           (rows, 1, n, 2))
    buffer.caches[0].update_and_fetch(keys, keys)
    return buffer


def test_mask_rules():
    buffer = BatchBuffer(1, 2)
    buffer.state.interleaved[:] = [False, True]
    kinds = np.array([[SOURCE, SOURCE, TARGET, TARGET], [SOURCE, EMPTY, TARGET, SOURCE]])
    ranks = np.array([[0, 1, 0, 0], [0, 0, 0, 1]])
    budgets = np.array([[0, 0, 1, 2], [0, 0, 0, 0]])
    buffer.state.begin(kinds, ranks, budgets, np.zeros(2))
    mask = np.array(buffer.state.make_mask(4))[:, 0]
    # group row: sources causal among sources; targets see their budget and targets.
    assert mask[0].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]]
    # interleaved row: everything filled up to itself; the empty column sees itself only.
    assert mask[1].tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]


def test_splice_right_aligns_and_pads_the_front():
    main = filled(2, [[SOURCE, TARGET, TARGET]])
    main.state.kind[1] = [SOURCE, SOURCE, SOURCE]
    main.state.last_target[:] = 2
    other = filled(1, [[SOURCE] * 5])
    main.splice(other, [(0, 1)])
    assert main.length == 5
    assert main.state.kind.tolist() == [[EMPTY, EMPTY, SOURCE, TARGET, TARGET], [SOURCE] * 5]
    assert main.state.last_target.tolist() == [4, -1]
    keys = np.array(main.caches[0].state[0])[:, 0, :, 0]
    assert keys[0, 2:].tolist() == [1, 2, 3] and keys[1].tolist() == [1, 2, 3, 4, 5]
    # a shorter one goes in the last columns; the row's earlier columns empty
    main.splice(filled(1, [[TARGET] * 2]), [(0, 0)])
    assert main.state.kind[0].tolist() == [EMPTY, EMPTY, EMPTY, TARGET, TARGET]
    assert main.state.last_target.tolist() == [4, -1]  # its own last target column


def test_compact_and_keep_rows_move_keys_with_their_record():
    buffer = filled(3, [[SOURCE, TARGET, TARGET, TARGET]] * 3)
    buffer.state.kind[:, :2] = EMPTY
    buffer.state.last_target[:] = 3
    assert buffer.compact(at_least=3) == 0  # too few to be worth a copy
    assert buffer.compact(at_least=2) == 2
    assert buffer.length == 2 and buffer.state.last_target.tolist() == [1, 1, 1]
    assert np.array(buffer.caches[0].state[0])[0, 0, :, 0].tolist() == [3, 4]
    buffer.state.kind[1, 0] = EMPTY
    buffer.keep_rows([1, 2])
    assert buffer.rows == 2 and buffer.state.kind.tolist() == [[EMPTY, TARGET],
                                                                [TARGET, TARGET]]
    buffer.drop_last_target(0)
    assert buffer.state.kind[0].tolist() == [EMPTY, EMPTY]
    with pytest.raises(RuntimeError, match="no target entry"):
        buffer.drop_last_target(0)
