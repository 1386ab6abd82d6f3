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

from dataclasses import dataclass
from functools import cached_property

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
        self._choice = None  # (lazy flag, other budgets): see begin()
        self._lanes: LanePlan | None = None  # the plan of a lanes prefill

    def start_target_group(self, start: int) -> None:
        """Fix the first target position now, if ``target_start="auto"`` left it open (an
        engine that feeds alternative budgets in several rows fixes it from the budget the
        incremental decoder would have had)."""
        if self.target_start is None:
            self.target_start = start

    def forget_target_start(self) -> None:
        """With ``target_start="auto"`` and no target slot left: the next target token
        fed fixes the start again (a look before the first word takes its header back)."""
        if self.n_target:
            raise AssertionError("cache: the target group still holds slots")
        self.target_start = self.fixed_target_start

    @property
    def length(self) -> int:
        return self.n_source + self.n_target

    def begin(self, kind: str, n: int, visible=None, choice=None):
        """Announce the next chunk: ``n`` tokens of ``kind`` (``"source"``/``"target"``).

        ``visible`` (target chunks, group layout): source tokens each query may see, the
        first ones in source order; an int, or an array of shape ``(rows, n)``. None: every
        source token in the cache. With ``target_start="auto"`` the target group starts
        at the budget of each row's first target token (the source tokens read at the
        first write).

        ``choice`` (with ``visible``): ``(flag, other)``, a lazy bool of shape (1,) and
        budgets shaped like ``visible``: where the flag holds on the device, the queries
        see ``other`` instead (a step fed before the host knew whether a read comes first).

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
        self._choice = None
        if choice is not None:
            if budgets is None:
                raise ValueError("choice: needs visible budgets to choose from")
            flag, other = choice
            self._choice = (flag, self._check_visible(other, n, is_target))
            if self._choice[1].shape != budgets.shape:
                raise ValueError(f"choice: expected budgets of shape {budgets.shape}, "
                                 f"got {self._choice[1].shape}")
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

    def begin_lanes(self, plan: LanePlan) -> None:
        """Announce the first forward of a prefilled engine (group layout, empty cache):
        the whole source and the assistant header in one model call, laid out in
        ``plan``'s lanes (batch rows of consecutive positions, see :func:`lane_plan`). The
        slots are the source tokens in order, then the header; a header query sees the
        source tokens below ``plan.budget`` and the header up to itself."""
        if self.layout != "group":
            raise ValueError("begin_lanes: lanes need the 'group' layout")
        if self.length:
            raise RuntimeError("begin_lanes: the cache must be empty")
        if self.target_start is None:
            self.target_start = plan.header_start
        elif self.target_start != plan.header_start:
            raise ValueError(f"begin_lanes: the plan starts the header at "
                             f"{plan.header_start}, the layout at {self.target_start}")
        self.runs = [[False, plan.n_source], [True, plan.n_header]]
        self.n_source, self.n_target = plan.n_source, plan.n_header
        self._chunk = (_LANES, plan.width, 0)
        self._visible = None
        self._lanes = plan
        self.offset = _offset(np.asarray(plan.offsets)) if len(plan.offsets) > 1 \
            else plan.offsets[0]

    @property
    def fused(self) -> bool:
        return self._chunk is not None and self._chunk[0] is None

    @property
    def lanes(self) -> LanePlan | None:
        """The plan of the announced chunk, when it is a lanes prefill."""
        return self._lanes if self._chunk is not None and self._chunk[0] is _LANES else None

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
        self._lanes = None

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
        if is_target is _LANES:
            return mx.array(self._lanes.mask()[:, None])
        if self._visible is not None:
            mask = mx.array(self._budget_mask(start, n, self._visible)[:, None])
            if self._choice is not None:
                flag, other = self._choice
                mask = mx.where(flag.reshape(1, 1, 1, 1),
                                mx.array(self._budget_mask(start, n, other)[:, None]), mask)
            return mask
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

    def _budget_mask(self, start: int, n: int, visible: np.ndarray) -> np.ndarray:
        """(rows, n, keys): a query sees the target slots up to itself and the source
        slots whose rank in source order is below its budget."""
        is_target = self.slot_is_target()
        source_rank = np.cumsum(~is_target) - ~is_target
        causal = np.arange(start + n)[None, :] <= (start + np.arange(n))[:, None]
        targets = is_target[None, :] & causal
        sources = (~is_target & causal)[None] & (
            source_rank[None, None, :] < visible[:, :, None])
        return sources | targets[None]

    def positions(self):
        """Positions of the tokens of the announced chunk (a tuple per row when rows
        start at different positions)."""
        if self._chunk is None:
            return ()
        is_target, n, _ = self._chunk
        if is_target is _LANES:  # the source, then the header (as two chunks)
            plan = self._lanes
            return (tuple(range(plan.n_source)),
                    tuple(range(plan.header_start, plan.header_start + plan.n_header)))
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


_LANES = "lanes"  # the kind of a lanes prefill chunk


@dataclass(frozen=True)
class LanePlan:
    """The source and the assistant header fed in one forward: batch rows (*lanes*) of
    ``width`` columns, each lane a run of consecutive positions (RoPE takes one offset
    per row), right-padded. ``slots[lane][col]`` is the cache slot a column fills (-1: a
    pad); the source takes slots ``0 .. n_source - 1`` (position = slot), the header the
    next ``n_header`` slots at positions ``header_start, ...``. ``last`` is the (lane,
    column) of the header's last token, whose logits give the first target token."""

    n_source: int
    n_header: int
    header_start: int
    budget: int  # source tokens the header's queries see
    width: int
    slots: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    last: tuple[int, int]

    @cached_property
    def pieces(self) -> tuple[tuple[int, int, int, int], ...]:
        """``(lane, first column, first slot, count)`` runs of consecutive slots (every
        layer writes them: computed once)."""
        out = []
        for lane, row in enumerate(self.slots):
            col = 0
            while col < len(row) and row[col] >= 0:
                end = col
                while end + 1 < len(row) and row[end + 1] == row[end] + 1:
                    end += 1
                out.append((lane, col, row[col], end - col + 1))
                col = end + 1
        return tuple(out)

    def mask(self) -> np.ndarray:
        """(lanes, width, keys): a source query sees the source slots up to itself; a
        header query the source slots below the budget and the header up to itself; a
        pad query slot 0 only (its output is never used, but must not be NaN)."""
        total = self.n_source + self.n_header
        slots = np.asarray(self.slots)
        keys = np.arange(total)
        source_key = keys < self.n_source
        header = slots >= self.n_source
        up_to_self = keys[None, None, :] <= slots[:, :, None]
        sees = np.where(header[:, :, None],
                        (source_key & (keys < self.budget))[None, None, :]
                        | (~source_key[None, None, :] & up_to_self),
                        source_key[None, None, :] & up_to_self)
        sees[slots < 0] = keys == 0
        return sees


def lane_plan(n_source: int, n_header: int, header_start: int, budget: int,
              max_lanes: int = 4) -> LanePlan:
    """Lay out a prefill of ``n_source`` source tokens (positions 0, 1, ...) and a header
    of ``n_header`` tokens at positions ``header_start, ...`` in as few padded columns as
    ``max_lanes`` lanes allow (a forward's cost follows rows x columns). The header goes
    right after the source tokens it continues in position (the first ``header_start``,
    or all of them when it starts past the source), so two runs of consecutive positions
    cover everything; each run is cut into lanes."""
    if n_source < 1 or n_header < 1:
        raise ValueError(f"lane_plan: expected a source and a header, got {n_source} "
                         f"and {n_header} tokens")
    if max_lanes < 2:
        raise ValueError(f"lane_plan: max_lanes must be >= 2 (two runs), got {max_lanes}")
    if header_start < 0 or not 0 <= budget <= n_source:
        raise ValueError(f"lane_plan: bad header start {header_start} or budget {budget}")
    header = [(header_start + i, n_source + i) for i in range(n_header)]  # (position, slot)
    cut = min(header_start, n_source)
    runs = [[(p, p) for p in range(cut)] + header, [(p, p) for p in range(cut, n_source)]]
    if header_start > n_source:  # not contiguous with the source: a run of its own
        runs = [[(p, p) for p in range(n_source)], header]
    runs = [r for r in runs if r]
    best = None
    for width in sorted({-(-len(r) // q) for r in runs for q in range(1, max_lanes + 1)}):
        lanes = sum(-(-len(r) // width) for r in runs)
        if lanes <= max_lanes and (best is None or lanes * width < best[0] * best[1]):
            best = (lanes, width)
    width = best[1]
    slots, offsets, last = [], [], None
    for run in runs:
        for lo in range(0, len(run), width):
            piece = run[lo : lo + width]
            offsets.append(piece[0][0])
            slots.append(tuple(s for _, s in piece) + (-1,) * (width - len(piece)))
            if piece[-1][1] == n_source + n_header - 1:
                last = (len(slots) - 1, len(piece) - 1)
    return LanePlan(n_source, n_header, header_start, budget, width, tuple(slots),
                    tuple(offsets), last)


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
        if self.shared.lanes is not None:
            return self._lanes_update(keys, values, self.shared.lanes)
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
        target token's: the source slots, then the target slot."""
        m, prev = keys.shape[2], self.length
        return self._scatter(keys, values, ((0, 0, prev, m), (1, m - 1, prev + m, 1)))

    def _lanes_update(self, keys, values, plan: LanePlan):
        """A lanes prefill: each lane's columns go to their slots (pads nowhere)."""
        return self._scatter(keys, values, plan.pieces)

    def _scatter(self, keys, values, pieces):
        """Write a multi-row chunk into the one chronological buffer: ``pieces`` are
        ``(row, first column, first slot, count)`` runs, which must fill the slots after
        the buffer's; every row gets the whole buffer back (their masks tell them apart)."""
        import mlx.core as mx

        total = self.length + sum(count for *_, count in pieces)
        if self.rows > 1:
            self.keys, self.values = self.keys[:1], self.values[:1]
        self._reserve(total, keys[:1], values[:1])
        for row, col, slot, count in pieces:
            self.keys[..., slot : slot + count, :] = keys[row : row + 1, :, col : col + count]
            self.values[..., slot : slot + count, :] = values[row : row + 1, :,
                                                              col : col + count]
        self.length = total
        k, v = self.keys[..., :total, :], self.values[..., :total, :]
        rows = keys.shape[0]
        return mx.broadcast_to(k, (rows, *k.shape[1:])), mx.broadcast_to(v, (rows, *v.shape[1:]))

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

    def keep_where(self, flag, n: int = 1) -> None:
        """Like :meth:`keep`, with the row chosen on the device: row 1's entries where the
        lazy bool ``flag`` (shape (1,)) holds, else row 0's (two-row buffers)."""
        import mlx.core as mx

        if self.rows != 2:
            raise ValueError(f"keep_where: expected a buffer of 2 rows, got {self.rows}")
        lo = self.length - n
        pick = flag.reshape(1, 1, 1, 1)
        for name in ("keys", "values"):
            buffer = getattr(self, name)
            buffer[:, :, lo : self.length, :] = mx.where(
                pick, buffer[1:2, :, lo : self.length, :], buffer[0:1, :, lo : self.length, :])

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
