"""StreamCache against a slot-list model of the layouts, and against mlx-lm's own KVCache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import layout_mask, layout_positions

from simulref.cache import (
    SOURCE,
    TARGET,
    StreamCache,
    StreamState,
    lane_plan,
    make_stream_cache,
)
from simulref.testing import tiny_model

# A chunk fed (kind, length) or a trim (None, n).
ops = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([SOURCE, TARGET]), st.integers(1, 5)),
        st.tuples(st.none(), st.integers(0, 4)),
    ),
    max_size=25,
)


def as_array(mask, n: int, total: int) -> np.ndarray:
    """make_mask's answer as queries x keys booleans."""
    if mask is None:
        return np.ones((n, total), dtype=bool)
    if isinstance(mask, str):
        assert mask == "causal"
        return np.arange(total)[None, :] <= (total - n + np.arange(n))[:, None]
    return np.array(mask)


class SlotModel:
    """Obviously-correct bookkeeping: a list of slot kinds, target start fixed on first use."""

    def __init__(self, target_start):
        self.slots: list[bool] = []
        self.target_start = None if target_start == "auto" else target_start

    def feed(self, is_target: bool, n: int) -> None:
        if is_target and self.target_start is None:
            self.target_start = len(self.slots) - sum(self.slots)
        self.slots += [is_target] * n

    def trim(self, n: int) -> None:
        del self.slots[len(self.slots) - min(n, len(self.slots)):]


@settings(max_examples=200)
@given(ops=ops, layout=st.sampled_from(["group", "interleaved"]),
       start=st.sampled_from(["auto", 0, 3]), return_array=st.booleans())
def test_positions_and_masks_match_the_slot_model(ops, layout, start, return_array):
    if layout == "interleaved":
        start = "auto"
    state = StreamState(layout, start)
    ref = SlotModel(start)
    for kind, n in ops:
        if kind is None:
            state.truncate(max(0, state.length - n))
            ref.trim(n)
            continue
        first = state.begin(kind, n)
        ref.feed(kind == TARGET, n)
        ts = ref.target_start if ref.target_start is not None else 0
        positions = layout_positions(ref.slots, layout, ts)
        assert state.positions() == tuple(positions[-n:])
        assert first == positions[-n]
        total = len(ref.slots)
        expected = layout_mask(ref.slots, layout)[-n:]
        mask = state.make_mask(n, return_array=return_array)
        assert np.array_equal(as_array(mask, n, total), expected)
        if return_array and n > 1:
            assert isinstance(mask, mx.array)
        assert state.length == total
        assert list(state.slot_is_target()) == ref.slots


def test_single_target_token_gets_no_mask():
    state = StreamState("group")
    state.begin(SOURCE, 4)
    state.begin(TARGET, 1)
    assert state.make_mask(1) is None
    state.begin(TARGET, 3)
    assert state.make_mask(3) == "causal"


def test_source_chunk_after_targets_gets_an_array_hiding_them():
    state = StreamState("group")
    state.begin(SOURCE, 2)
    state.begin(TARGET, 2)
    state.begin(SOURCE, 1)
    assert np.array(state.make_mask(1)).tolist() == [[True, True, False, False, True]]
    assert state.offset == 2


def test_trimming_the_last_target_token_and_refeeding_it_keeps_its_position():
    state = StreamState("group")
    state.begin(SOURCE, 5)
    state.begin(TARGET, 3)  # positions 5, 6, 7 (auto start = 5)
    state.begin(TARGET, 1)  # position 8
    state.truncate(state.length - 1)
    state.begin(SOURCE, 2)  # the next source word: positions 5, 6 in the source group
    assert state.positions() == (5, 6)
    assert state.begin(TARGET, 1) == 8  # re-fed at the same target position


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_all_source_chunks_equal_one_prefill(arch):
    model = tiny_model(arch, 0)
    ids = list(range(5, 45))
    reference = model(mx.array(ids)[None])
    caches = make_stream_cache(model)
    outs = []
    for a, b in [(0, 10), (10, 11), (11, 30), (30, 40)]:
        caches[0].shared.begin(SOURCE, b - a)
        outs.append(model(mx.array(ids[a:b])[None], cache=caches))
    assert mx.allclose(mx.concatenate(outs, axis=1), reference, atol=1e-4).item()


def test_layer_buffers_grow_in_steps_and_return_every_slot():
    state = StreamState("group")
    cache = StreamCache(state)
    rng = np.random.default_rng(0)
    kept = []
    for n in [3, 250, 1, 1, 300, 2]:
        kv = mx.array(rng.normal(size=(1, 2, n, 4)).astype(np.float32))
        state.begin(SOURCE, n)
        keys, values = cache.update_and_fetch(kv, kv * 2)
        kept.append(np.array(kv))
        ref = np.concatenate(kept, axis=2)
        assert np.array_equal(np.array(keys), ref)
        assert np.array_equal(np.array(values), ref * 2)
        assert cache.keys.shape[2] % StreamCache.step == 0
    assert cache.size() == cache.length == sum(k.shape[2] for k in kept)
    assert cache.nbytes == cache.keys.nbytes * 2


def test_trim_is_shared_once_across_layers():
    caches = [StreamCache(StreamState("group"))]
    caches.append(StreamCache(caches[0].shared))
    state = caches[0].shared
    kv = mx.zeros((1, 1, 4, 2))
    for kind in (SOURCE, TARGET):
        state.begin(kind, 4)
        for c in caches:
            c.update_and_fetch(kv, kv)
    assert [c.trim(3) for c in caches] == [3, 3]  # as mlx_lm.trim_prompt_cache calls it
    assert (state.n_source, state.n_target) == (4, 1)
    assert all(c.length == 5 for c in caches)
    assert caches[0].trim(10) == 5 and state.length == 0


def test_an_unannounced_chunk_raises():
    state = StreamState("group")
    cache = StreamCache(state)
    state.begin(SOURCE, 2)
    with pytest.raises(RuntimeError, match="announce every chunk"):
        cache.update_and_fetch(mx.zeros((1, 1, 3, 2)), mx.zeros((1, 1, 3, 2)))


def test_protocol_odds_and_ends():
    cache = StreamCache(StreamState())
    assert cache.empty() and cache.nbytes == 0 and cache.state == []
    assert cache.is_trimmable()
    with pytest.raises(TypeError, match="cannot be set"):
        cache.state = (mx.zeros(1), mx.zeros(1))
    cache.shared.begin(SOURCE, 2)
    with pytest.raises(ValueError, match="sliding-window"):
        cache.make_mask(2, window_size=4)


@pytest.mark.parametrize("layout, start", [("bogus", "auto"), ("group", -1),
                                           ("group", "zero"), ("interleaved", 0)])
def test_bad_layout_or_start(layout, start):
    with pytest.raises(ValueError, match="layout|target_start"):
        StreamState(layout, start)


def test_models_with_sliding_window_caches_are_refused():
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=16, num_hidden_layers=2,
                           intermediate_size=32, num_attention_heads=2, rms_norm_eps=1e-5,
                           vocab_size=32, layer_types=["sliding_attention", "full_attention"],
                           sliding_window=8)
    with pytest.raises(ValueError, match="RotatingKVCache"):
        make_stream_cache(llama.Model(args))


def test_recurrent_caches_are_refused():
    from mlx_lm.models import mamba

    args = mamba.ModelArgs(model_type="mamba", vocab_size=32, hidden_size=16,
                           intermediate_size=32, state_size=4, num_hidden_layers=1,
                           conv_kernel=2, use_bias=False, use_conv_bias=True,
                           time_step_rank=4)
    with pytest.raises(ValueError, match="ArraysCache|MambaCache"):
        make_stream_cache(mamba.Model(args))


# ---------------------------------------------------------------- source budgets, rows


def budget_mask_model(slots: list[bool], n: int, budgets) -> np.ndarray:
    """Obviously correct: query q (the q-th of the last n slots) of row r sees a slot at
    or before itself that is a target slot, or a source slot among the first
    budgets[r][q] source slots."""
    total = len(slots)
    out = np.zeros((len(budgets), n, total), dtype=bool)
    for r, row in enumerate(budgets):
        for q in range(n):
            query = total - n + q
            rank = 0
            for key, is_target in enumerate(slots):
                if key <= query:
                    out[r, q, key] = is_target or rank < row[q]
                if not is_target:
                    rank += 1
    return out


@settings(max_examples=150)
@given(data=st.data(), ops=ops, rows=st.integers(1, 3), start=st.sampled_from(["auto", 0, 3]))
def test_budget_masks_and_positions_match_the_slot_model(data, ops, rows, start):
    state = StreamState("group", start)
    ref = SlotModel(start)
    for kind, n in ops:
        if kind is None:
            state.truncate(max(0, state.length - n))
            ref.trim(n)
            continue
        n_source = len(ref.slots) - sum(ref.slots)
        if kind == TARGET and n_source:
            budgets = data.draw(st.lists(st.lists(st.integers(0, n_source), min_size=n,
                                                  max_size=n), min_size=rows, max_size=rows))
            if ref.target_start is None:
                firsts = {row[0] for row in budgets}
                ref.target_start = budgets[0][0] if len(firsts) == 1 else [
                    row[0] for row in budgets]
            state.begin(kind, n, visible=budgets)
            ref.slots += [True] * n
            mask = np.array(state.make_mask(n))[:, 0]
            assert np.array_equal(mask, budget_mask_model(ref.slots, n, budgets))
            k = sum(ref.slots) - n
            starts = ref.target_start if isinstance(ref.target_start, list) else None
            if starts is None:
                assert state.positions() == tuple(range(ref.target_start + k,
                                                        ref.target_start + k + n))
            else:
                assert state.positions() == tuple(tuple(range(s + k, s + k + n))
                                                  for s in starts)
                assert np.array(state.offset).tolist() == [s + k for s in starts]
        else:
            state.begin(kind, n)
            ref.feed(kind == TARGET, n)


@pytest.mark.parametrize("visible, error", [
    (5, ValueError), ([[1, 2]], ValueError), ([[1.5]], TypeError), ([[-1]], ValueError)])
def test_bad_budgets_are_refused(visible, error):
    state = StreamState("group")
    state.begin(SOURCE, 3)
    with pytest.raises(error, match="visible"):
        state.begin(TARGET, 1, visible=visible)


def test_budgets_need_a_group_target_chunk():
    state = StreamState("interleaved")
    state.begin(SOURCE, 3)
    with pytest.raises(ValueError, match="group"):
        state.begin(TARGET, 1, visible=2)
    with pytest.raises(ValueError, match="target chunks"):
        StreamState("group").begin(SOURCE, 1, visible=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rows_with_two_budgets_equal_one_row_forwards(arch):
    """One token in two rows (budgets 4 and 7 of 9 source tokens) gives each row the
    logits, keys and values of a one-row forward with that budget; keep() then makes both
    rows hold the chosen row's entry, and a one-row chunk narrows the buffer."""
    model = tiny_model(arch)
    source = mx.array([[5, 9, 14, 3, 22, 8, 30, 11, 2]])
    target = [17, 4]

    def run(visibles):
        caches = make_stream_cache(model)
        caches[0].shared.begin(SOURCE, 9)
        model(source, cache=caches)
        caches[0].shared.start_target_group(4)
        caches[0].shared.begin(TARGET, 1, visible=4)
        model(mx.array([[target[0]]]), cache=caches)
        rows = len(visibles)
        caches[0].shared.begin(TARGET, 1, visible=[[v] for v in visibles])
        out = model(mx.array([[target[1]]] * rows), cache=caches)
        return caches, out[:, -1]

    both_caches, both = run([4, 7])
    for row, v in enumerate([4, 7]):
        one_caches, one = run([v])
        np.testing.assert_allclose(np.array(both[row]), np.array(one[0]), atol=1e-5)
        np.testing.assert_allclose(np.array(both_caches[0].keys[row, :, :11]),
                                   np.array(one_caches[0].keys[0, :, :11]), atol=1e-5)
    assert np.abs(np.array(both[0]) - np.array(both[1])).max() > 1e-3  # budgets matter
    for cache in both_caches:
        cache.keep(1)
    np.testing.assert_array_equal(np.array(both_caches[0].keys[0, :, :11]),
                                  np.array(both_caches[0].keys[1, :, :11]))
    both_caches[0].shared.begin(TARGET, 1)
    model(mx.array([[3]]), cache=both_caches)
    assert both_caches[0].rows == 1 and both_caches[0].length == 12


# ---------------------------------------------------------------- lanes prefill


@settings(max_examples=300)
@given(n_source=st.integers(1, 60), n_header=st.integers(1, 6), data=st.data(),
       max_lanes=st.integers(2, 5))
def test_a_lane_plan_covers_every_slot_once_in_runs_of_positions(n_source, n_header, data,
                                                                 max_lanes):
    start = data.draw(st.integers(0, n_source + 4), label="header_start")
    budget = data.draw(st.integers(0, n_source), label="budget")
    plan = lane_plan(n_source, n_header, start, budget, max_lanes=max_lanes)
    slots = np.asarray(plan.slots)
    assert slots.shape == (len(plan.offsets), plan.width) and len(plan.offsets) <= max_lanes
    total = n_source + n_header
    assert sorted(slots[slots >= 0].tolist()) == list(range(total))
    position_of = {s: s for s in range(n_source)}
    position_of.update({n_source + i: start + i for i in range(n_header)})
    for lane, row in enumerate(slots):
        real = row[row >= 0]
        assert (row[len(real):] < 0).all()  # pads on the right only
        # RoPE gives a lane consecutive positions from its offset.
        assert [position_of[s] for s in real] == list(range(plan.offsets[lane],
                                                            plan.offsets[lane] + len(real)))
    lane, col = plan.last
    assert slots[lane, col] == total - 1
    # No more padding than one lane per run of positions needs at that width.
    assert slots.size - total < len(plan.offsets) * plan.width
    runs = 1 if start == n_source else 2
    assert len(plan.offsets) >= runs


@settings(max_examples=100)
@given(n_source=st.integers(1, 30), n_header=st.integers(1, 5), data=st.data())
def test_a_lane_plan_mask_is_the_slot_model_of_source_then_header(n_source, n_header, data):
    start = data.draw(st.integers(0, n_source + 3), label="header_start")
    budget = data.draw(st.integers(0, n_source), label="budget")
    plan = lane_plan(n_source, n_header, start, budget)
    mask = plan.mask()
    total = n_source + n_header
    for lane, row in enumerate(plan.slots):
        for col, slot in enumerate(row):
            if slot < 0:
                expected = np.arange(total) == 0
            elif slot < n_source:  # source: causal over the source
                expected = np.arange(total) <= slot
            else:  # header: the budget, then the header up to itself
                expected = (np.arange(total) < budget) | (
                    (np.arange(total) >= n_source) & (np.arange(total) <= slot))
            np.testing.assert_array_equal(mask[lane, col], expected)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("start, budget", [(7, 7), (3, 5), (12, 12), (0, 4), (15, 9)])
def test_a_lanes_prefill_equals_a_source_then_a_header_forward(arch, start, budget):
    """Source and header in one forward of several lanes: the header's last logits and
    every key and value equal those of two one-row forwards (the source, then the header
    at its budget)."""
    model = tiny_model(arch)
    source, header = [5, 9, 14, 3, 22, 8, 30, 11, 2, 19, 7, 26], [40, 41, 42]
    plan = lane_plan(len(source), len(header), start, budget)
    assert len(plan.offsets) > 1 or start == len(source)

    lanes = make_stream_cache(model, target_start=start)
    lanes[0].shared.begin_lanes(plan)
    ids = np.asarray(source + header)
    slots = np.asarray(plan.slots)
    out = model(mx.array(np.where(slots >= 0, ids[np.maximum(slots, 0)], 0)), cache=lanes)
    lane, col = plan.last

    plain = make_stream_cache(model, target_start=start)
    plain[0].shared.begin(SOURCE, len(source))
    model(mx.array([source]), cache=plain)
    plain[0].shared.begin(TARGET, len(header), visible=budget)
    expected = model(mx.array([header]), cache=plain)[0, -1]
    np.testing.assert_allclose(np.array(out[lane, col]), np.array(expected), atol=1e-5)
    for a, b in zip(lanes, plain, strict=True):
        assert a.length == b.length == len(source) + len(header)
        np.testing.assert_allclose(np.array(a.keys[:1, :, : a.length]),
                                   np.array(b.keys[:1, :, : b.length]), atol=1e-5)
        np.testing.assert_allclose(np.array(a.values[:1, :, : a.length]),
                                   np.array(b.values[:1, :, : b.length]), atol=1e-5)
    assert lanes[0].shared.positions() == (tuple(range(len(source))),
                                           tuple(range(start, start + len(header))))


def test_lanes_need_an_empty_group_cache():
    plan = lane_plan(4, 2, 4, 4)
    with pytest.raises(ValueError, match="group"):
        StreamState("interleaved").begin_lanes(plan)
    state = StreamState("group")
    state.begin(SOURCE, 2)
    with pytest.raises(RuntimeError, match="empty"):
        state.begin_lanes(plan)
    with pytest.raises(ValueError, match="header at 4"):
        StreamState("group", target_start=0).begin_lanes(plan)
    with pytest.raises(ValueError, match="source and a header"):
        lane_plan(0, 2, 0, 0)
    with pytest.raises(ValueError, match="max_lanes"):
        lane_plan(4, 2, 4, 4, max_lanes=1)


@pytest.mark.parametrize("flag", [False, True])
def test_a_choice_on_the_device_picks_the_budgets_and_the_kept_row(flag):
    """A step fed before the host knows whether a read comes first: keep_where() and the
    choice of budgets made from a lazy flag equal keep(row) and those budgets."""
    model = tiny_model("llama")
    source = mx.array([[5, 9, 14, 3, 22, 8, 30, 11, 2]])

    def run(choose):
        caches = make_stream_cache(model)
        shared = caches[0].shared
        shared.begin(SOURCE, 9)
        model(source, cache=caches)
        shared.start_target_group(4)
        shared.begin(TARGET, 1, visible=[[4], [6]])
        model(mx.array([[17], [17]]), cache=caches)
        out = choose(caches, shared)
        return caches, out[:, -1]

    def on_device(caches, shared):
        lazy = mx.array([flag])
        for cache in caches:
            cache.keep_where(lazy)
        shared.begin(TARGET, 1, visible=[[4], [6]], choice=(lazy, [[6], [8]]))
        return model(mx.array([[3], [3]]), cache=caches)

    def on_host(caches, shared):
        for cache in caches:
            cache.keep(int(flag))
        shared.begin(TARGET, 1, visible=[[6], [8]] if flag else [[4], [6]])
        return model(mx.array([[3], [3]]), cache=caches)

    (a_caches, a), (b_caches, b) = run(on_device), run(on_host)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
    for x, y in zip(a_caches, b_caches, strict=True):
        np.testing.assert_allclose(np.array(x.keys[:, :, :11]), np.array(y.keys[:, :, :11]),
                                   atol=1e-5)
    with pytest.raises(ValueError, match="choice: expected budgets of shape"):
        StreamState("group").begin(TARGET, 1, visible=0, choice=(mx.array([True]), [[0], [0]]))
