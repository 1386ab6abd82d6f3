"""Evict the oldest source and target tokens from a group-layout cache, positions re-based.

Long-form decoding (:mod:`simulref.longform`) keeps finished sentence pairs in the KV
cache and drops the oldest ones when the context passes its budget. What an eviction
removes is a run of source tokens (just after the prefix, in source order) and a run of
target tokens (just after the assistant header, in target order); the prefix and the
header always stay. Afterwards the cache holds the kept tokens **in group order** (the
kept source tokens, then the kept target tokens), at re-based positions: each group
counts on from where it was as if the evicted tokens had never been there (source
positions shift down by the evicted source length, target positions by the evicted
target length; ``target_start`` stays). Later chunks are appended chronologically as
before; :meth:`Evictor.budgets` keeps what each compacted target slot may see.

Two methods:

``reprefill`` (the twin; exact)
    Throw the buffers away and prefill the kept context again: the kept source tokens in
    one chunk (source sees source only), then the kept target tokens in one chunk, each
    query seeing the kept source tokens it saw when it was first fed (its *budget* minus
    the evicted tokens below it) and the target tokens before it. This is the cache a
    decoder would have built had the evicted tokens never been read or written: the
    definition of an exact eviction. Cost: one forward over the kept context.
``rotate`` (the fast path)
    Drop the evicted slots and rotate the kept keys by ``-delta`` (RoPE is a rotation by
    ``position x frequency``, so rotating a key cached at ``p`` by ``-delta`` gives the key
    at ``p - delta``, up to float error). Only for models whose every attention layer
    uses a plain ``mlx.nn.RoPE`` (:func:`rotation_unsupported` says why not; the evictor
    then falls back to ``reprefill`` and says so in :attr:`Evictor.fallback`).

**What ``rotate`` does not do.** It re-bases positions exactly, but a kept token's keys
and values in layers past the first were computed by attention over the tokens now
evicted (its hidden state remembers them); a fresh prefill computes them without. So
``rotate`` equals ``reprefill`` exactly in the first layer (keys and values depend only
on the token and its position there), and for a one-layer model everywhere, logits
included; in deeper layers it keeps a trace of the evicted context (what StreamingLLM-style
caches do). tests/unit/test_evict.py holds both facts. ``reprefill`` is the default.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .cache import SOURCE, TARGET

METHODS = ("reprefill", "rotate")


def rotation_unsupported(model) -> str | None:
    """None when every attention layer of ``model`` applies a plain ``mlx.nn.RoPE``
    (exactly that class: its rotation by ``-delta`` is known); else why not. Scaled or
    custom RoPE classes (Llama 3, YaRN, SuScaled, ...) are not assumed to compose."""
    import mlx.nn as nn

    layers = getattr(model, "layers", None)
    if not layers:
        return f"{type(model).__name__} has no attention layers to inspect"
    for i, layer in enumerate(layers):
        rope = getattr(getattr(layer, "self_attn", None), "rope", None)
        if rope is None:
            return f"layer {i} has no self_attn.rope"
        if type(rope) is not nn.RoPE:
            return f"layer {i} uses {type(rope).__name__}, not a plain mlx.nn.RoPE"
    return None


def _body(model):
    """The model without its head where we know how (only the cache is wanted)."""
    from .engine import last_position_head

    split = last_position_head(model)
    return model if split is None else split[0]


class Evictor:
    """Evicts from one model's :class:`~simulref.cache.StreamCache` list (group layout).

    ``method``: ``"reprefill"`` or ``"rotate"``; a model that cannot rotate runs
    ``reprefill`` and :attr:`fallback` holds the reason."""

    def __init__(self, model, caches, method: str = "reprefill"):
        if method not in METHODS:
            raise ValueError(f"eviction: expected one of {METHODS}, got {method!r}")
        if not caches:
            raise ValueError("caches: expected the StreamCache list of a model")
        self.model = model
        self.caches = caches
        self.shared = caches[0].shared
        if self.shared.layout != "group":
            raise ValueError(f"layout: eviction needs the 'group' layout, got "
                             f"{self.shared.layout!r}")
        self.requested = method
        self.fallback = rotation_unsupported(model) if method == "rotate" else None
        self.method = "reprefill" if self.fallback else method
        # Budgets of the compacted target slots (the first ones in target order, from the
        # last eviction); later target slots follow the chronological order.
        self._stored: list[int] = []

    def budgets(self) -> np.ndarray:
        """Per target slot in the cache (in target order): how many source tokens, the
        first in source order, its entry saw when it was computed."""
        is_target = self.shared.slot_is_target()
        before = np.cumsum(~is_target) - ~is_target  # source slots before each slot
        out = before[is_target].astype(np.int64)
        n = min(len(self._stored), len(out))
        out[:n] = self._stored[:n]
        return out

    def evict(self, source: tuple[int, int], target: tuple[int, int],
              source_ids: Sequence[int] = (), target_ids: Sequence[int] = ()) -> None:
        """Remove ``source = (first, count)`` tokens in source order and ``target =
        (first, count)`` in target order. ``source_ids`` / ``target_ids``: the token ids
        of every source / target slot in the cache, in group order (``reprefill`` feeds
        the kept ones again; ``rotate`` ignores them)."""
        shared = self.shared
        ns, nt = shared.n_source, shared.n_target
        (s_lo, s_n), (t_lo, t_n) = _check_range("source", source, ns), \
            _check_range("target", target, nt)
        is_target = shared.slot_is_target()
        source_slots, target_slots = np.flatnonzero(~is_target), np.flatnonzero(is_target)
        kept_source = np.concatenate([source_slots[:s_lo], source_slots[s_lo + s_n:]])
        kept_index = np.concatenate([np.arange(t_lo), np.arange(t_lo + t_n, nt)]).astype(int)
        budgets = self.budgets()[kept_index]
        # A kept target entry saw the first V source tokens; the evicted ones among them go.
        budgets = budgets - np.clip(budgets - s_lo, 0, s_n)
        if self.method == "rotate":
            self._rotate(kept_source, target_slots[kept_index], s_lo, s_n, t_lo, t_n)
        else:
            if len(source_ids) != ns or len(target_ids) != nt:
                raise ValueError(f"source_ids, target_ids: expected {ns} and {nt} ids (the "
                                 f"cache's slots), got {len(source_ids)} and "
                                 f"{len(target_ids)}")
            kept_ids = [*source_ids[:s_lo], *source_ids[s_lo + s_n:]]
            kept_targets = [target_ids[i] for i in kept_index]
            self._reprefill(kept_ids, kept_targets, budgets)
        self._stored = [int(b) for b in budgets]

    # -- the two methods

    def _set_groups(self, n_source: int, n_target: int) -> None:
        shared = self.shared
        shared.runs = [r for r in ([False, n_source], [True, n_target]) if r[1]]
        shared.n_source, shared.n_target = n_source, n_target
        shared.truncate(n_source + n_target)  # clears the announced chunk; drops nothing

    def _rotate(self, kept_source, kept_target, s_lo, s_n, t_lo, t_n) -> None:
        import mlx.core as mx

        order = mx.array(np.concatenate([kept_source, kept_target]).astype(np.int32))
        ns = len(kept_source)
        for layer, cache in zip(self.model.layers, self.caches, strict=True):
            rope = layer.self_attn.rope
            keys = cache.keys[..., order, :]
            values = cache.values[..., order, :]
            # Slots past the evicted run of each group move down by its length.
            pieces = [keys[..., :s_lo, :], _shift(rope, keys[..., s_lo:ns, :], s_n),
                      keys[..., ns : ns + t_lo, :], _shift(rope, keys[..., ns + t_lo:, :], t_n)]
            keys = mx.concatenate([p for p in pieces if p.shape[2]], axis=2)
            _replace(cache, keys, values)
        self._set_groups(ns, len(kept_target))

    def _reprefill(self, source_ids, target_ids, budgets) -> None:
        import mlx.core as mx

        shared = self.shared
        start = shared.target_start
        for cache in self.caches:  # free the old buffers before the new ones are built
            cache.keys = cache.values = None
            cache.length = 0
        self._set_groups(0, 0)
        shared.target_start = start
        body = _body(self.model)
        if source_ids:
            shared.begin(SOURCE, len(source_ids))
            body(mx.array([list(source_ids)], dtype=mx.int32), cache=self.caches)
        if target_ids:
            shared.begin(TARGET, len(target_ids),
                         visible=np.asarray(budgets, dtype=np.int64)[None])
            body(mx.array([list(target_ids)], dtype=mx.int32), cache=self.caches)
        mx.eval([c.keys for c in self.caches if c.keys is not None]
                + [c.values for c in self.caches if c.values is not None])
        shared.truncate(shared.length)  # forget the announced chunk


def _check_range(name: str, span, size: int) -> tuple[int, int]:
    try:
        first, count = (int(x) for x in span)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected (first, count), got {span!r}") from None
    if first < 0 or count < 0 or first + count > size:
        raise ValueError(f"{name}: ({first}, {count}) is outside the {size} {name} "
                         f"tokens in the cache")
    return first, count


def _shift(rope, keys, delta: int):
    """``keys`` (B, heads, n, D), each rotated by ``-delta`` positions: one RoPE call with
    every slot on a row of its own, so all get the same offset."""
    if delta == 0 or keys.shape[2] == 0:
        return keys
    shape = keys.shape
    return rope(keys.reshape(-1, 1, shape[-1]), offset=-delta).reshape(shape)


def _replace(cache, keys, values) -> None:
    """Give ``cache`` new buffers holding exactly ``keys``/``values`` (room grown in the
    cache's steps), so the evicted slots' memory goes."""
    import mlx.core as mx

    n = keys.shape[2]
    size = max(cache.step, -(-n // cache.step) * cache.step)
    new_k = mx.zeros((*keys.shape[:2], size, keys.shape[3]), keys.dtype)
    new_v = mx.zeros((*values.shape[:2], size, values.shape[3]), values.dtype)
    new_k[..., :n, :] = keys
    new_v[..., :n, :] = values
    mx.eval(new_k, new_v)
    cache.keys, cache.values, cache.length = new_k, new_v, n
