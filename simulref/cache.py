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

**Source budgets** (group layout). A target chunk may say how much of the source each of
its queries sees: ``begin(TARGET, n, visible=V)``, V the number of source tokens (the
first ones in source order) visible to each query, an int or an array of shape
``(rows, n)``. This is what lets a source be prefilled whole while a target query sees
only the words read so far (the prefilled engine), lets one forward carry the same token
in several *rows* with different budgets (two-budget rows), and lets training build the
decoder's wait-k masks (one row per example). A layer buffer holds as many rows as the
widest chunk fed; rows agree on every slot but those of the last chunk until
:meth:`StreamCache.keep` picks one.
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
        self._visible: np.ndarray | None = None  # (rows, n) source budgets of that chunk

    def start_target_group(self, start: int) -> None:
        """Fix the first target position now, if ``target_start="auto"`` left it open (an
        engine that feeds alternative budgets in several rows fixes it from the budget the
        incremental decoder would have had)."""
        if self.target_start is None:
            self.target_start = start

    @property
    def length(self) -> int:
        return self.n_source + self.n_target

    def begin(self, kind: str, n: int, visible=None):
        """Announce the next chunk: ``n`` tokens of ``kind`` (``"source"``/``"target"``).

        ``visible`` (target chunks, group layout): source tokens each query may see, the
        first ones in source order; an int, or an array of shape ``(rows, n)``. None: every
        source token in the cache. With ``target_start="auto"`` the target group starts
        at the budget of each row's first target token (the source tokens read at the
        first write).

        Returns the position of its first token (an array of one per row when rows start
        at different positions); the chunk's tokens take consecutive positions from there.
        """
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        if n < 1:
            raise ValueError(f"n: expected a chunk of at least one token, got {n!r}")
        is_target = kind == TARGET
        budgets = self._check_visible(visible, n, is_target)
        if self.layout == "interleaved":
            position = self.length
        elif is_target:
            if self.target_start is None:  # "auto": fixed by the first target token fed
                self.target_start = (self.n_source if budgets is None
                                     else _one_or_many(budgets[:, 0]))
            position = self.target_start + self.n_target
        else:
            position = self.n_source
        self._visible = budgets
        self._chunk = (is_target, n, self.length)
        if self.runs and self.runs[-1][0] == is_target:
            self.runs[-1][1] += n
        else:
            self.runs.append([is_target, n])
        if is_target:
            self.n_target += n
        else:
            self.n_source += n
        self.offset = _offset(position)
        return position

    def _check_visible(self, visible, n: int, is_target: bool) -> np.ndarray | None:
        if visible is None:
            return None
        if not is_target or self.layout != "group":
            raise ValueError("visible: a source budget applies to target chunks in the "
                             "'group' layout only")
        budgets = np.asarray(visible)
        if budgets.dtype.kind not in "iu":
            raise TypeError(f"visible: expected ints, got {budgets.dtype}")
        if budgets.ndim == 0:
            budgets = np.full((1, n), int(budgets))
        if budgets.ndim != 2 or budgets.shape[1] != n:
            raise ValueError(f"visible: expected an int or shape (rows, {n}), "
                             f"got shape {budgets.shape}")
        if budgets.size and (budgets.min() < 0 or budgets.max() > self.n_source):
            raise ValueError(f"visible: expected budgets in [0, {self.n_source}] (the source "
                             f"tokens in the cache), got {budgets.min()}..{budgets.max()}")
        return budgets.astype(np.int64)

    def begin_fused(self, m: int) -> tuple[int, int]:
        """Announce a fused read (group layout): one forward of two rows, row 0 a source
        chunk of ``m`` tokens, row 1 the last target token fed again, left-padded to ``m``
        (its real query is the last). The chunk takes ``m + 1`` slots: the source tokens,
        then the target token. Returns (first source position, target position)."""
        if self.layout != "group":
            raise ValueError("begin_fused: a fused read needs the 'group' layout")
        if m < 1:
            raise ValueError(f"m: expected a chunk of at least one token, got {m!r}")
        if self.target_start is None:
            raise RuntimeError("begin_fused: no target token was fed yet")
        source, target = self.n_source, self.target_start + self.n_target
        self._chunk = (None, m, self.length)  # None: a fused chunk
        self._visible = None
        for is_target, count in ((False, m), (True, 1)):
            if self.runs and self.runs[-1][0] == is_target:
                self.runs[-1][1] += count
            else:
                self.runs.append([is_target, count])
        self.n_source += m
        self.n_target += 1
        self.offset = _offset(np.array([source, target - (m - 1)]))
        return source, target

    @property
    def fused(self) -> bool:
        return self._chunk is not None and self._chunk[0] is None

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
        self._visible = None

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
        if is_target is None:
            return mx.array(self._fused_mask(start, n)[:, None])
        if self._visible is not None:
            return mx.array(self._budget_mask(start, n)[:, None])
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

    def _fused_mask(self, start: int, m: int) -> np.ndarray:
        """(2, m, keys): row 0's source queries see source slots up to themselves; row 1's
        last query (the target token) sees every slot; its pad queries see slot 0 only
        (their outputs are never used, but must not be NaN)."""
        total = start + m + 1
        keys = np.arange(total)
        causal = keys[None, :] <= (start + np.arange(m))[:, None]
        source = ~self.slot_is_target()[None, :] & causal
        target = np.zeros((m, total), dtype=bool)
        target[-1] = True
        target[:-1, 0] = True
        return np.stack([source, target])

    def _budget_mask(self, start: int, n: int) -> np.ndarray:
        """(rows, n, keys): a query sees the target slots up to itself and the source
        slots whose rank in source order is below its budget."""
        is_target = self.slot_is_target()
        source_rank = np.cumsum(~is_target) - ~is_target
        causal = np.arange(start + n)[None, :] <= (start + np.arange(n))[:, None]
        targets = is_target[None, :] & causal
        sources = (~is_target & causal)[None] & (
            source_rank[None, None, :] < self._visible[:, :, None])
        return sources | targets[None]

    def positions(self):
        """Positions of the tokens of the announced chunk (a tuple per row when rows
        start at different positions)."""
        if self._chunk is None:
            return ()
        is_target, n, _ = self._chunk
        if is_target is None:  # fused: the source rows, then the padded target row
            source, target = self.n_source - n, self.target_start + self.n_target - 1
            return (tuple(range(source, source + n)), tuple(range(target - n + 1, target + 1)))
        if self.layout == "interleaved":
            first = self.length - n
        elif is_target:
            first = self.target_start + self.n_target - n
        else:
            first = self.n_source - n
        if isinstance(first, np.ndarray):
            return tuple(tuple(range(int(f), int(f) + n)) for f in first)
        return tuple(range(int(first), int(first) + n))


def _one_or_many(values: np.ndarray):
    """An int when every row agrees, else the per-row array."""
    values = np.asarray(values, dtype=np.int64)
    return int(values[0]) if (values == values[0]).all() else values


def _offset(position):
    """``cache.offset`` as mlx-lm's attention hands it to ``mx.fast.rope``: an int, or an
    array of one offset per batch row."""
    if isinstance(position, np.ndarray):
        import mlx.core as mx

        return mx.array(position.astype(np.int32))
    return position


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

    @property
    def rows(self) -> int:
        return 0 if self.keys is None else self.keys.shape[0]

    def update_and_fetch(self, keys, values):
        """Append the chunk's keys/values. The buffer widens to the chunk's rows (the
        slots so far are the same in every row); a one-row chunk after a wider one
        narrows it to row 0 (call :meth:`keep` first to choose what row 0 holds)."""
        import mlx.core as mx

        n = keys.shape[2]
        prev = self.length
        self.shared.check_chunk(prev, n)
        if self.shared.fused:
            return self._fused_update(keys, values)
        rows = keys.shape[0]
        if self.keys is not None and rows != self.rows:
            if rows == 1:
                self.keys, self.values = self.keys[:1], self.values[:1]
            elif self.rows == 1:
                self.keys = mx.repeat(self.keys, rows, axis=0)
                self.values = mx.repeat(self.values, rows, axis=0)
            else:
                raise ValueError(f"StreamCache: a chunk of {rows} rows reached a buffer of "
                                 f"{self.rows} rows")
        self._reserve(prev + n, keys, values)
        self.keys[..., prev : prev + n, :] = keys
        self.values[..., prev : prev + n, :] = values
        self.length = prev + n
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    def _fused_update(self, keys, values):
        """A fused read: row 0's keys are the source chunk's, row 1's last key is the
        target token's. Both go into the one chronological buffer (source slots, then the
        target slot); both rows get the whole buffer back."""
        import mlx.core as mx

        m, prev = keys.shape[2], self.length
        if self.rows > 1:
            self.keys, self.values = self.keys[:1], self.values[:1]
        self._reserve(prev + m + 1, keys, values)
        self.keys[..., prev : prev + m, :] = keys[:1]
        self.values[..., prev : prev + m, :] = values[:1]
        self.keys[..., prev + m : prev + m + 1, :] = keys[1:2, :, m - 1 : m]
        self.values[..., prev + m : prev + m + 1, :] = values[1:2, :, m - 1 : m]
        self.length = prev + m + 1
        k, v = self.keys[..., : self.length, :], self.values[..., : self.length, :]
        return mx.broadcast_to(k, (2, *k.shape[1:])), mx.broadcast_to(v, (2, *v.shape[1:]))

    def _reserve(self, total: int, keys, values) -> None:
        """Room for ``total`` slots, grown in steps (no per-token concatenation)."""
        import mlx.core as mx

        if self.keys is not None and total <= self.keys.shape[2]:
            return
        prev = self.length
        B = self.keys.shape[0] if self.keys is not None else keys.shape[0]
        _, n_kv_heads, _, k_dim = keys.shape
        size = ((total + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((B, n_kv_heads, size, k_dim), keys.dtype)
        new_v = mx.zeros((B, n_kv_heads, size, values.shape[3]), values.dtype)
        if self.keys is not None and prev:
            new_k[..., :prev, :] = self.keys[..., :prev, :]
            new_v[..., :prev, :] = self.values[..., :prev, :]
        self.keys, self.values = new_k, new_v

    def keep(self, row: int, n: int = 1) -> None:
        """Make every row hold row ``row``'s entries in the last ``n`` slots (the rows of
        a multi-budget forward become one choice)."""
        if self.rows <= 1 or n <= 0:
            return
        if not 0 <= row < self.rows:
            raise ValueError(f"row: expected 0 <= row < {self.rows}, got {row!r}")
        lo = self.length - n
        self.keys[:, :, lo : self.length, :] = self.keys[row : row + 1, :, lo : self.length, :]
        self.values[:, :, lo : self.length, :] = self.values[row : row + 1, :, lo : self.length, :]

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
