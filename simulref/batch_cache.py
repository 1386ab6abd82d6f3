"""BatchBuffer: one KV cache for many sentences (rows), through mlx-lm's cache protocol.

Every row is one sentence being translated; its cache entries lie in *columns* of one
buffer per layer, shape ``(rows, kv_heads, columns, head_dim)``. A forward appends the
same number of columns to every row (a row with nothing to feed gets an empty column),
so rows of different lengths share one buffer, right-aligned as in mlx-lm's
``BatchKVCache`` (a sentence that joins later is written into the last columns, the
columns before it empty in its row). What each column of each row holds is recorded
beside it, in numpy: ``kind`` (empty, source or target) and, for source tokens, their
rank in source order. The mask of every forward is built from that record, so:

- an *empty* column (padding, an idle row's step, a cache entry dropped by a re-feed)
  is seen by no query;
- a *source* query (group layout) sees the source columns up to itself; a *target*
  query sees the target columns up to itself and the source columns whose rank is
  below its *budget* (the source tokens read so far); in the ``interleaved`` layout a
  query sees every non-empty column up to itself;
- positions are each row's own (``cache.offset`` is one offset per row, which
  ``mx.fast.rope`` takes as an array).

A dropped entry is not cut out (the other rows' columns stay where they are): its
column just becomes empty. Leading columns empty in every row are dropped from time to
time (:meth:`BatchBuffer.compact`).
"""

from __future__ import annotations

import numpy as np

EMPTY, SOURCE, TARGET = 0, 1, 2


class BatchState:
    """The column record shared by the layers of one :class:`BatchBuffer`, and the chunk
    announced for the next forward (its mask and offsets)."""

    def __init__(self, rows: int):
        # Per row: whether it is in the interleaved layout (else the group layout).
        self.interleaved = np.zeros(rows, dtype=bool)
        self.kind = np.zeros((rows, 0), dtype=np.int8)
        self.rank = np.zeros((rows, 0), dtype=np.int32)
        # Per row: the column of its last target token (the one a re-feed replaces).
        self.last_target = np.full(rows, -1, dtype=np.int64)
        self.offset = 0  # mx array of one RoPE offset per row, for the announced chunk
        self._mask = None
        self._chunk: tuple[int, int] | None = None  # (first column, n)

    @property
    def rows(self) -> int:
        return self.kind.shape[0]

    @property
    def length(self) -> int:
        return self.kind.shape[1]

    def begin(self, kinds, ranks, budgets, positions) -> None:
        """Announce a chunk of ``n`` columns for every row: ``kinds`` (rows, n) (EMPTY for
        padding), ``ranks`` (rows, n) of source tokens, ``budgets`` (rows, n) of target
        queries (group layout), ``positions`` (rows,) of each row's first column."""
        import mlx.core as mx

        kinds = np.asarray(kinds, dtype=np.int8)
        rows, n = kinds.shape
        if rows != self.rows or n < 1:
            raise ValueError(f"BatchState.begin: expected ({self.rows}, n >= 1) kinds, "
                             f"got {kinds.shape}")
        start = self.length
        self.kind = np.concatenate([self.kind, kinds], axis=1)
        self.rank = np.concatenate([self.rank, np.asarray(ranks, dtype=np.int32)], axis=1)
        self._mask = mx.array(self._chunk_mask(start, n, np.asarray(budgets))[:, None])
        self.offset = mx.array(np.asarray(positions, dtype=np.int32))
        self._chunk = (start, n)
        is_target = kinds == TARGET
        fed = is_target.any(axis=1)
        # the last target column of each row that fed one
        last = start + n - 1 - is_target[:, ::-1].argmax(axis=1)
        self.last_target = np.where(fed, last, self.last_target)

    def _chunk_mask(self, start: int, n: int, budgets: np.ndarray) -> np.ndarray:
        """(rows, n, columns): who sees what; see the module docstring."""
        columns = np.arange(start + n)
        query_columns = start + np.arange(n)
        causal = columns[None, None, :] <= query_columns[None, :, None]
        query_kind = self.kind[:, start:, None]
        filled = (self.kind != EMPTY)[:, None, :]
        source = (self.kind == SOURCE)[:, None, :]
        target = (self.kind == TARGET)[:, None, :]
        in_budget = self.rank[:, None, :] < budgets[:, :, None]
        group = np.where(query_kind == SOURCE, source & causal,
                         (target & causal) | (source & in_budget & causal))
        seen = np.where(self.interleaved[:, None, None], filled & causal, group)
        itself = columns[None, None, :] == query_columns[None, :, None]
        # An empty query (padding) sees only itself: its output is unused but must not be
        # NaN. Every query sees itself.
        return np.where(query_kind == EMPTY, itself, seen | itself)

    def check_chunk(self, start: int, n: int) -> None:
        if self._chunk != (start, n):
            raise RuntimeError(f"BatchBuffer: a chunk of {n} column(s) reached a layer holding "
                               f"{start} but the announced chunk is {self._chunk}")

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        if window_size is not None:
            raise ValueError("BatchBuffer: sliding-window attention is not supported")
        if self._chunk is None or self._chunk[1] != n:
            raise RuntimeError(f"BatchBuffer: mask asked for {n} token(s) but the announced "
                               f"chunk is {self._chunk}")
        return self._mask


class BatchLayerCache:
    """One layer's keys and values, all rows; speaks mlx-lm's cache protocol."""

    step = 256

    def __init__(self, shared: BatchState):
        self.shared = shared
        self.keys = None
        self.values = None
        self.length = 0

    @property
    def offset(self):
        return self.shared.offset

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        return self.shared.make_mask(N, return_array=return_array, window_size=window_size)

    def update_and_fetch(self, keys, values):
        n = keys.shape[2]
        prev = self.length
        self.shared.check_chunk(prev, n)
        self._reserve(prev + n, keys, values)
        self.keys[..., prev : prev + n, :] = keys
        self.values[..., prev : prev + n, :] = values
        self.length = prev + n
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    def _reserve(self, total: int, keys, values, rows: int | None = None) -> None:
        """Room for ``total`` columns (grown in steps), shaped like ``keys``/``values``
        with ``rows`` rows (default: theirs)."""
        import mlx.core as mx

        if self.keys is not None and total <= self.keys.shape[2]:
            return
        _, heads, _, k_dim = keys.shape
        rows = keys.shape[0] if rows is None else rows
        size = ((total + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((rows, heads, size, k_dim), keys.dtype)
        new_v = mx.zeros((rows, heads, size, values.shape[3]), values.dtype)
        if self.keys is not None and self.length:
            new_k[..., : self.length, :] = self.keys[..., : self.length, :]
            new_v[..., : self.length, :] = self.values[..., : self.length, :]
        self.keys, self.values = new_k, new_v

    def is_trimmable(self) -> bool:
        return False

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self):
        if self.keys is None:
            return []
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]


class BatchBuffer:
    """The caches of every layer of a model for ``rows`` sentences, with the column
    record (:class:`BatchState`). Pass ``buffer.caches`` as ``model(..., cache=)`` after
    :meth:`BatchState.begin` (``buffer.state``)."""

    def __init__(self, n_layers: int, rows: int):
        self.state = BatchState(rows)
        self.caches = [BatchLayerCache(self.state) for _ in range(n_layers)]

    @property
    def rows(self) -> int:
        return self.state.rows

    @property
    def length(self) -> int:
        return self.state.length

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def drop_last_target(self, row: int) -> None:
        """Row ``row`` no longer holds its last target entry (a re-feed replaces it)."""
        column = self.state.last_target[row]
        if column < 0 or self.state.kind[row, column] != TARGET:
            raise RuntimeError(f"BatchBuffer: row {row} has no target entry to drop")
        self.state.kind[row, column] = EMPTY

    def clear(self, row: int) -> None:
        """Row ``row``'s sentence is done: every column of the row becomes empty."""
        self.state.kind[row] = EMPTY
        self.state.last_target[row] = -1

    def splice(self, other: BatchBuffer, pairs) -> int:
        """Write rows of ``other`` (a batch just prefilled) into rows of this one, as
        ``(other_row, row)`` pairs, right-aligned: they take this buffer's last columns
        (the buffer grows at the front when ``other`` is longer). Those rows' earlier
        columns become empty. Returns the column ``other``'s column 0 went to."""
        import mlx.core as mx

        width = other.length
        if width > self.length:
            self._pad_front(width - self.length)
        lo = self.length - width
        for theirs, mine in pairs:
            self.state.kind[mine] = EMPTY
            self.state.kind[mine, lo:] = other.state.kind[theirs]
            self.state.rank[mine, lo:] = other.state.rank[theirs]
            last = other.state.last_target[theirs]
            self.state.last_target[mine] = lo + last if last >= 0 else -1
            self.state.interleaved[mine] = other.state.interleaved[theirs]
        rows = mx.array([mine for _, mine in pairs])
        picks = mx.array([theirs for theirs, _ in pairs])
        for cache, new in zip(self.caches, other.caches, strict=True):
            if cache.keys is None:  # nothing fed yet: a buffer shaped like theirs
                cache._reserve(width, new.keys, new.values, rows=self.rows)
                cache.length = width
            cache.keys[rows, :, lo : lo + width, :] = new.keys[picks, :, :width, :]
            cache.values[rows, :, lo : lo + width, :] = new.values[picks, :, :width, :]
        return lo

    def _pad_front(self, pad: int) -> None:
        """``pad`` empty columns before the first one, in every row."""
        import mlx.core as mx

        rows = self.rows
        self.state.last_target = np.where(self.state.last_target >= 0,
                                          self.state.last_target + pad, -1)
        self.state.kind = np.concatenate([np.zeros((rows, pad), np.int8), self.state.kind], 1)
        self.state.rank = np.concatenate([np.zeros((rows, pad), np.int32), self.state.rank], 1)
        for cache in self.caches:
            if cache.keys is None:
                continue
            old_k, old_v, length = cache.keys, cache.values, cache.length
            cache.keys = cache.values = None
            cache.length = 0
            cache._reserve(length + pad, old_k, old_v)
            cache.keys[..., pad : pad + length, :] = old_k[..., :length, :]
            cache.values[..., pad : pad + length, :] = old_v[..., :length, :]
            cache.length = length + pad
            mx.eval(cache.keys, cache.values)

    def compact(self, at_least: int = 64) -> int:
        """Drop the leading columns that are empty in every row, when there are at least
        ``at_least`` of them (moving the buffer costs a copy). Returns how many went."""
        filled = (self.state.kind != EMPTY).any(axis=0)
        first = int(filled.argmax()) if filled.any() else self.length
        if first < at_least:
            return 0
        self.state.kind = self.state.kind[:, first:]
        self.state.rank = self.state.rank[:, first:]
        self.state.last_target = np.where(self.state.last_target >= first,
                                          self.state.last_target - first, -1)
        for cache in self.caches:
            self._move(cache, slice(None), first)
        return first

    def keep_rows(self, rows) -> None:
        """Keep only ``rows`` (a list of row indices, in their new order)."""
        import mlx.core as mx

        self.state.kind = self.state.kind[rows]
        self.state.rank = self.state.rank[rows]
        self.state.last_target = self.state.last_target[rows]
        self.state.interleaved = self.state.interleaved[rows]
        self._reselect(mx.array(list(rows)))

    def _reselect(self, rows) -> None:
        for cache in self.caches:
            self._move(cache, rows, 0)

    @staticmethod
    def _move(cache: BatchLayerCache, rows, first: int) -> None:
        import mlx.core as mx

        if cache.keys is None:
            return
        keys = cache.keys[rows, :, first : cache.length, :]
        values = cache.values[rows, :, first : cache.length, :]
        cache.keys = cache.values = None
        cache.length = 0
        cache._reserve(keys.shape[2], keys, values)
        cache.keys[..., : keys.shape[2], :] = keys
        cache.values[..., : values.shape[2], :] = values
        cache.length = keys.shape[2]
        mx.eval(cache.keys, cache.values)
