"""StreamCache: mlx-lm's KV-cache protocol with group positions and source-only masks.

mlx-lm attention layers talk to their cache through a small duck-typed protocol:
``cache.offset`` is the RoPE position of the first token of the chunk being fed,
``cache.update_and_fetch(keys, values)`` appends the chunk's keys/values and returns all
of them, and the model asks one cache per forward for a mask with
``cache.make_mask(N, return_array=..., window_size=...)``. A :class:`StreamCache` speaks
that protocol for one layer; the bookkeeping that does not depend on the layer (which
group the chunk belongs to, its positions, its mask) lives once in a shared
:class:`StreamState`, so it is done once per forward, not once per layer.

Each layer keeps one chronological KV buffer (grown in steps like ``KVCache``): slots in
the order tokens were fed, source and target interleaved. What differs between layouts
is only the positions handed to RoPE and the mask:

``group`` (default)
    Source tokens (prefix, words, suffix) count 0, 1, 2, ... in their own group; target
    tokens (assistant header first) count from ``target_start`` in theirs. A source chunk
    sees only source keys (causal within the chunk): the source part of the cache is then
    exactly what a one-shot prefill of the source would give, whatever was written in
    between. A target chunk sees every key before it.
    ``target_start="auto"`` is the number of source tokens in the cache when the first
    target token is fed, so reading the whole source first reproduces offline generation.
    An int fixes it (0 is the paper's phi = 0, for fine-tuned models).
``interleaved``
    One chronological counter and a plain causal mask: a source chunk read after some
    target words sees them, and its positions come after theirs.

The decoder announces every chunk with :meth:`StreamState.begin` before calling the
model; a cache fed a chunk that was not announced raises instead of misplacing it.
"""

from __future__ import annotations

import numpy as np

SOURCE = "source"
TARGET = "target"
KINDS = (SOURCE, TARGET)
LAYOUTS = ("group", "interleaved")


def _check_target_start(target_start, layout: str):
    if target_start == "auto":
        return None
    if isinstance(target_start, bool) or not isinstance(target_start, int) or target_start < 0:
        raise ValueError(f"target_start: expected 'auto' or an int >= 0, got {target_start!r}")
    if layout != "group":
        raise ValueError(f"target_start: an explicit start applies to the 'group' layout only, "
                         f"got target_start={target_start!r} with layout={layout!r}")
    return target_start


class StreamState:
    """Chronological layout of the cache, shared by all layer caches of one model.

    ``runs`` lists the slots as ``[is_target, count]`` runs in feeding order. ``offset`` is
    the position of the first token of the chunk announced last.
    """

    def __init__(self, layout: str = "group", target_start: int | str = "auto"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.fixed_target_start = _check_target_start(target_start, layout)
        self.reset()

    def reset(self) -> None:
        """Forget every slot (the layer buffers are reused, not freed)."""
        self.runs: list[list] = []
        self.n_source = 0
        self.n_target = 0
        self.target_start = self.fixed_target_start
        self.offset = 0
        self._chunk: tuple[bool, int, int] | None = None  # (is_target, n, first slot)

    @property
    def length(self) -> int:
        return self.n_source + self.n_target

    def begin(self, kind: str, n: int) -> int:
        """Announce the next chunk: ``n`` tokens of ``kind`` (``"source"``/``"target"``).

        Returns the position of its first token; the chunk's tokens take consecutive
        positions from there.
        """
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        if n < 1:
            raise ValueError(f"n: expected a chunk of at least one token, got {n!r}")
        is_target = kind == TARGET
        if self.layout == "interleaved":
            position = self.length
        elif is_target:
            if self.target_start is None:  # "auto": fixed by the first target token fed
                self.target_start = self.n_source
            position = self.target_start + self.n_target
        else:
            position = self.n_source
        self._chunk = (is_target, n, self.length)
        if self.runs and self.runs[-1][0] == is_target:
            self.runs[-1][1] += n
        else:
            self.runs.append([is_target, n])
        if is_target:
            self.n_target += n
        else:
            self.n_source += n
        self.offset = position
        return position

    def check_chunk(self, start: int, n: int) -> None:
        """Raise unless a layer holding ``start`` slots may take the announced ``n`` tokens."""
        chunk = self._chunk
        if chunk is None or chunk[1] != n or chunk[2] != start:
            raise RuntimeError(
                f"StreamCache: a chunk of {n} token(s) reached a layer holding {start} slot(s) "
                f"but the announced chunk is {chunk}; announce every chunk with "
                "StreamState.begin(kind, n) before calling the model")

    def truncate(self, length: int) -> None:
        """Drop slots past ``length`` (idempotent, so every layer's ``trim`` may call it)."""
        excess = self.length - length
        while excess > 0:
            is_target, count = self.runs[-1]
            take = min(count, excess)
            if take == count:
                self.runs.pop()
            else:
                self.runs[-1][1] -= take
            if is_target:
                self.n_target -= take
            else:
                self.n_source -= take
            excess -= take
        self._chunk = None

    def slot_is_target(self) -> np.ndarray:
        """One bool per slot, in feeding order: whether it holds a target token."""
        if not self.runs:
            return np.zeros(0, dtype=bool)
        flags = np.array([r[0] for r in self.runs], dtype=bool)
        return np.repeat(flags, [r[1] for r in self.runs])

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        """The mask for the announced chunk: None / ``"causal"`` / a bool array
        (queries x keys, True = may attend)."""
        import mlx.core as mx

        if window_size is not None:
            raise ValueError("StreamCache: sliding-window attention is not supported (the "
                             "window would cut across source and target groups)")
        if self._chunk is None or self._chunk[1] != n:
            raise RuntimeError(f"StreamCache: mask asked for {n} token(s) but the announced "
                               f"chunk is {self._chunk}")
        is_target, _, start = self._chunk
        if self.layout == "group" and not is_target and self.n_target > 0:
            # A source chunk must not see target keys: the source part of the cache stays
            # what a prefill of the source alone would give.
            keys = np.arange(start + n)
            visible = ~self.slot_is_target()[None, :] & (
                keys[None, :] <= (start + np.arange(n))[:, None])
            return mx.array(visible)
        if n == 1:
            return None  # one query seeing every key: the fast path
        if return_array:
            keys = np.arange(start + n)
            return mx.array(keys[None, :] <= (start + np.arange(n))[:, None])
        return "causal"  # mlx aligns it to the last keys: the chunk sees everything before it

    def positions(self) -> tuple[int, ...]:
        """Positions of the tokens of the announced chunk."""
        if self._chunk is None:
            return ()
        return tuple(range(self.offset, self.offset + self._chunk[1]))


class StreamCache:
    """The KV cache of one attention layer, in feeding order; see the module docstring."""

    step = 256

    def __init__(self, shared: StreamState):
        self.shared = shared
        self.keys = None
        self.values = None
        self.length = 0

    @property
    def offset(self) -> int:
        return self.shared.offset

    def update_and_fetch(self, keys, values):
        import mlx.core as mx

        n = keys.shape[2]
        prev = self.length
        self.shared.check_chunk(prev, n)
        if self.keys is None or prev + n > self.keys.shape[2]:
            # Grow in steps: no per-token concatenation on the decode path.
            B, n_kv_heads, _, k_dim = keys.shape
            v_dim = values.shape[3]
            size = ((prev + n + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, n_kv_heads, size, k_dim), keys.dtype)
            new_v = mx.zeros((B, n_kv_heads, size, v_dim), values.dtype)
            if self.keys is not None and prev:
                new_k[..., :prev, :] = self.keys[..., :prev, :]
                new_v[..., :prev, :] = self.values[..., :prev, :]
            self.keys, self.values = new_k, new_v
        self.keys[..., prev : prev + n, :] = keys
        self.values[..., prev : prev + n, :] = values
        self.length = prev + n
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        return self.shared.make_mask(N, return_array=return_array, window_size=window_size)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last ``n`` slots (the group counters follow); returns how many."""
        n = min(self.length, n)
        self.length -= n
        self.shared.truncate(self.length)
        return n

    def reset(self) -> None:
        self.length = 0
        self.shared.truncate(0)

    def size(self) -> int:
        return self.length

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    @property
    def state(self):
        if self.keys is None:
            return []
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    @state.setter
    def state(self, value):
        raise TypeError("StreamCache: its state cannot be set (slot groups are not saved); "
                        "build a new cache with make_stream_cache()")


# Caches that keep something other than every key of every token: groups cannot be kept
# apart (recurrent state, sliding windows, chunked attention, ...).
def _check_architecture(model) -> int:
    from mlx_lm.models.cache import KVCache

    layers = getattr(model, "layers", None)
    if not hasattr(model, "make_cache"):
        if layers is None:
            raise TypeError(f"model: expected an mlx-lm model with .layers, "
                            f"got {type(model).__name__}")
        return len(layers)
    caches = model.make_cache()
    bad = sorted({type(c).__name__ for c in caches if type(c) is not KVCache})
    if bad:
        name = getattr(model, "model_type", type(model).__module__)
        raise ValueError(
            f"model: architecture {name!r} uses {', '.join(bad)} in some layers (recurrent "
            "state, sliding-window or chunked attention); simulref needs a plain KV cache in "
            "every layer to keep source and target groups apart")
    return len(caches)


def make_stream_cache(model, layout: str = "group",
                      target_start: int | str = "auto") -> list[StreamCache]:
    """One :class:`StreamCache` per layer of ``model``, sharing one :class:`StreamState`
    (reach it as ``caches[0].shared``). Pass the list as ``model(..., cache=caches)``.

    Raises ``ValueError`` for architectures whose ``make_cache()`` holds anything but plain
    ``KVCache`` layers (Mamba, Qwen3-Next, sliding-window models, ...).
    """
    n_layers = _check_architecture(model)
    shared = StreamState(layout, target_start)
    return [StreamCache(shared) for _ in range(n_layers)]
