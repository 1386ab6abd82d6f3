"""Batched simultaneous decoding: many sentences in one forward, for evaluation at scale.

``translate_batch(model, tokenizer, sources, ...)`` gives the same traces as
``[translate(model, tokenizer, s, ...) for s in sources]`` (greedy; up to float rounding
at near-ties), with up to ``batch_size`` sentences in every forward. Each sentence keeps
its own read/write loop (:class:`simulref.loop._Run`: policy, word boundaries, EOS
handling, guards); only how its tokens reach the model changes. The loop runs until it
needs a token (its engine, a :class:`_Row`, returns ``PENDING``); when every row waits,
one forward serves them all and every row goes on.

How a sentence is fed (see docs/decoder.md, "Batched decoding"):

- **Joining** (once per sentence, when its loop first asks for a token): in the group
  layout the whole source is prefilled, then the assistant header goes in at the budget
  of the words read (the prefilled engine's layout, one budget per row); in the
  interleaved layout the source read so far and the header go in as one causal chunk.
  The sentences joining together share these forwards (left-padded), in a buffer of
  their own, which is then written into the batch's buffer (:meth:`BatchBuffer.splice`).
- **Steps**: every forward of the batch feeds one token per row: a target token (seeing
  the row's target and its source budget), the re-feed of the last target token after a
  read (its old entry dropped, as the incremental engine trims it), or in the
  interleaved layout one token of a word read. A row with more than one token to feed
  takes one per step; a row with nothing to feed gets an empty column.
- Continuous batching: a finished sentence frees its row for the next one, so a long
  sentence does not hold the batch.

Rows never speculate (no pipelining) and never use two budgets: in a batch the re-feed
after a read costs its row one step, not the batch a forward.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .batch_cache import SOURCE, TARGET, BatchBuffer
from .config import DecodeConfig
from .decoder import PENDING, Feed, _make_run, _model_name, known_prompt, source_words
from .engine import is_greedy, last_position_head
from .trace import Trace

ENGINE_NAME = "batched"


@dataclass(frozen=True)
class BatchForward:
    """One model call of a batch, for the ``on_forward`` hook (tests, benchmarks):
    ``kind`` "join" or "step", ``rows`` in the call, ``tokens`` per row, ``busy`` rows
    with real work (the others are padding), ``cache_bytes`` the batch buffer's size."""

    kind: str
    rows: int
    tokens: int
    busy: int
    cache_bytes: int = 0


@dataclass(frozen=True)
class Finished:
    """A sentence of the batch is done (``key``: its index in ``sources``, or the key of
    its :class:`Item`): its ``trace``, when it joined and finished
    (``time.monotonic()``), and ``compute_seconds``, its share of the batch's forwards
    (each forward's time split evenly over the rows with work in it; summed over every
    sentence it is the time the batch spent in forwards)."""

    key: object
    trace: Trace
    started: float
    finished: float
    compute_seconds: float


class _Row:
    """The engine of one sentence in a batch: it records what the loop wants fed and
    returns ``PENDING`` from ``peek`` until the batch has fed it."""

    name = ENGINE_NAME

    def __init__(self, template, word_ids: Sequence[Sequence[int]], prompt: int,
                 interleaved: bool):
        self.template = template
        self.word_ids = [list(ids) for ids in word_ids]  # the last with the suffix
        self.prompt = prompt  # the whole prompt's tokens, assistant header included
        self.interleaved = interleaved  # a read feeds the word's tokens (after targets)
        self.prefix: list[int] = []
        self.ends: list[int] = []  # ends[r]: source tokens of the prefix and r words
        self.read_count = 0
        self.fed: list[int] = []  # target tokens in the cache (the loop's context check)
        self.ahead: int | None = None  # the token predicted next, once computed
        self.reads_since_sample = 0
        self.waiting = False  # peek returned PENDING; the batch owes a token
        self.joined = False
        self.queue: deque = deque()  # (token, kind) to feed, one per step
        self.drop_last = False  # the last target entry is to be dropped (re-fed)
        # Positions, kept by the batch: source and target tokens in the cache.
        self.n_source = 0
        self.n_target = 0
        self.target_start = 0

    @property
    def budget(self) -> int:
        return self.ends[self.read_count]

    def read_ids(self) -> list[int]:
        """The prefix and the words read so far (their ids)."""
        return self.prefix + [t for w in self.word_ids[: self.read_count] for t in w]

    def all_source(self) -> list[int]:
        return self.prefix + [t for w in self.word_ids for t in w]

    # -- the loop's calls

    def start(self, prefix_ids: Sequence[int]) -> None:
        self.prefix = list(prefix_ids)
        self.ends = [len(self.prefix)]
        for word in self.word_ids:
            self.ends.append(self.ends[-1] + len(word))

    def read(self, ids: Sequence[int]) -> None:
        self.read_count += 1
        if not self.fed:
            return  # not joined yet: the join sees every word read before it
        if self.reads_since_sample == 0:
            # The pending token was predicted without this word: drop it, and the last
            # target token's entry, which is fed again at the new budget.
            self.ahead = None
            self.drop_last = True
        self.reads_since_sample += 1
        if self.interleaved:
            self.queue.extend((t, SOURCE) for t in ids)

    def peek(self, may_read: bool = True):
        if self.ahead is not None:
            return self.ahead
        if not self.waiting:
            if not self.fed:
                header = list(self.template.header_ids)
                if not header:
                    raise ValueError("chat_format: the assistant header tokenizes to nothing")
                self.fed.extend(header)
            elif self.reads_since_sample:
                self.queue.append((self.fed[-1], TARGET))  # the re-feed
            elif not self.queue:
                raise AssertionError("batch: no pending token although no source was read")
            self.waiting = True
        return PENDING

    def accept(self, token: int, speculate: bool = False, may_read: bool = True,
               forecast=None) -> None:
        self.fed.append(token)
        self.ahead = None
        self.queue.append((token, TARGET))

    def resolve(self, token: int) -> None:
        """The batch computed the token the loop waits for."""
        self.ahead = token
        self.waiting = False
        self.reads_since_sample = 0


@dataclass
class _Slot:
    item: object
    run: object
    row: _Row
    events: Iterator
    collected: list
    started: float
    compute: float = 0.0

    @property
    def config(self):
        return self.item.config


def check_sources(sources) -> list:
    """A list of sources known up front (str, or a sequence of words)."""
    if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence):
        raise TypeError(f"sources: expected a sequence of sources (str or a list of words), "
                        f"got {type(sources).__name__}")
    for i, source in enumerate(sources):
        if isinstance(source, Feed) or not isinstance(source, (str, Sequence)) or isinstance(
                source, bytes):
            raise TypeError(f"sources[{i}]: expected a str or a sequence of words (a batch "
                            f"decodes sources known up front), got {type(source).__name__}")
    return list(sources)


def check_batch_size(batch_size) -> int:
    from .checks import check_int

    return check_int("batch_size", batch_size, minimum=1)


def batchable(config: DecodeConfig) -> bool:
    """Whether a batch decodes ``config`` in its rows (group and interleaved layouts, the
    engine left to choose, a count-only policy); other configs are decoded one at a time
    in the batch's turn. Observing policies (they read each token's probability) and
    LocalAgreement (its own loop) are among those: the same traces, not batched yet."""
    from .policy import is_agreement

    policy = config.the_policy()
    if getattr(policy, "observes", False) or is_agreement(policy):
        return False
    return config.layout in ("group", "interleaved") and config.engine in ("auto",
                                                                           "prefilled")


@dataclass(frozen=True)
class Item:
    """One sentence to decode: ``key`` names it in the results, ``source`` is known up
    front, ``config`` its decode options."""

    key: object
    source: object
    config: DecodeConfig


class _Batch:
    """The scheduler: rows, their loops, the joins and steps."""

    def __init__(self, model, tokenizer, batch_size: int, model_id: str | None,
                 on_forward: Callable | None):
        from .limits import context_length

        if on_forward is not None and not callable(on_forward):
            raise TypeError(f"on_forward: expected a callable or None, got {on_forward!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = check_batch_size(batch_size)
        self.name = _model_name(model, model_id)
        self.on_forward = on_forward
        self.context = context_length(model)
        self.split = last_position_head(model)
        self.n_layers = len(model.make_cache()) if hasattr(model, "make_cache") else len(
            model.layers)
        self.buffer: BatchBuffer | None = None
        self._templates: dict = {}

    def template(self, config: DecodeConfig):
        from .prompt import template_for

        key = (config.system, id(config.chat_format))
        if key not in self._templates:
            self._templates[key] = (template_for(self.tokenizer, system=config.system,
                                                 chat_format=config.chat_format),
                                    config.chat_format)  # (kept alive with its id)
        return self._templates[key][0]

    # -- model calls

    def _forward(self, buffer: BatchBuffer, tokens: np.ndarray, kinds, ranks, budgets,
                 positions, logits_wanted: bool):
        import mlx.core as mx

        buffer.state.begin(kinds, ranks, budgets, positions)
        batch = mx.array(tokens.astype(np.int32))
        if not logits_wanted:
            self.model(batch, cache=buffer.caches)  # only the cache is wanted: stays lazy
            return None
        if self.split is None:
            return self.model(batch, cache=buffer.caches)[:, -1, :]
        body, head = self.split
        return head(body(batch, cache=buffer.caches)[:, -1:, :])[:, -1, :]

    def _sample(self, logits, slots: list[_Slot]) -> list[int]:
        """One token per slot from its row of ``logits``: greedy rows by one argmax, rows
        with a sampler each by theirs."""
        import mlx.core as mx

        greedy = [is_greedy(s.config.sampler) for s in slots]
        if all(greedy):
            return mx.argmax(logits, axis=-1).tolist()
        tokens = mx.argmax(logits, axis=-1).tolist()
        for j, slot in enumerate(slots):
            if not greedy[j]:
                row = logits[j : j + 1]
                tokens[j] = slot.config.sampler(
                    row - mx.logsumexp(row, axis=-1, keepdims=True)).item()
        return tokens

    def _report(self, kind: str, rows: int, tokens: int, busy: int) -> None:
        if self.on_forward is not None:
            size = 0 if self.buffer is None else self.buffer.nbytes
            self.on_forward(BatchForward(kind, rows, tokens, busy, size))

    def _join(self, slots: list[_Slot]) -> BatchBuffer:
        """Prefill the sentences of ``slots`` (each waiting for its first token) in a
        buffer of their own, left-padded; their assistant header is queued for the steps
        (one token per step costs a row far less than a forward of its own)."""
        g = len(slots)
        buffer = BatchBuffer(self.n_layers, g)
        # Group layout: the whole source (reads only move the budget); interleaved: the
        # source read so far (later words are fed as they are read, after the target).
        interleaved = np.array([s.config.layout == "interleaved" for s in slots])
        sources = [s.row.read_ids() if inter else s.row.all_source()
                   for s, inter in zip(slots, interleaved, strict=True)]
        width = max(map(len, sources))
        tokens = np.zeros((g, width), np.int64)
        kinds = np.zeros((g, width), np.int8)
        ranks = np.zeros((g, width), np.int32)
        positions = np.zeros(g, np.int64)
        for j, ids in enumerate(sources):
            pad = width - len(ids)
            tokens[j, pad:] = ids
            kinds[j, pad:] = SOURCE
            ranks[j, pad:] = np.arange(len(ids))
            positions[j] = -pad  # the real tokens take positions 0, 1, ...
        buffer.state.interleaved[:] = interleaved
        self._forward(buffer, tokens, kinds, ranks, np.zeros((g, width), np.int64),
                      positions, logits_wanted=False)
        self._report("join", g, width, g)
        for slot, ids, inter in zip(slots, sources, interleaved, strict=True):
            row = slot.row
            row.n_source = len(ids)
            starts = slot.config.target_start
            if inter:
                row.target_start = 0  # (positions are chronological)
            else:
                row.target_start = row.budget if starts == "auto" else starts
            row.queue.extend((t, TARGET) for t in row.fed)  # the header
            row.joined = True
        return buffer

    def _step(self, slots: list[_Slot | None]) -> list[int]:
        """One token for every waiting row of the batch buffer; returns the rows whose
        loop can go on (their token resolved)."""
        import mlx.core as mx

        buffer = self.buffer
        B = buffer.rows
        tokens = np.zeros((B, 1), np.int64)
        kinds = np.zeros((B, 1), np.int8)
        ranks = np.zeros((B, 1), np.int32)
        budgets = np.zeros((B, 1), np.int64)
        positions = np.zeros(B, np.int64)
        busy = []
        for b, slot in enumerate(slots):
            if slot is None or not slot.row.waiting or not slot.row.joined:
                continue
            row = slot.row
            if row.drop_last:
                buffer.drop_last_target(b)
                row.n_target -= 1
                row.drop_last = False
            token, kind = row.queue.popleft()
            tokens[b, 0], kinds[b, 0] = token, kind
            if buffer.state.interleaved[b]:
                positions[b] = row.n_source + row.n_target
            elif kind == TARGET:
                positions[b] = row.target_start + row.n_target
            else:  # (not reached: the group layout prefills the source)
                positions[b] = row.n_source
            if kind == SOURCE:
                ranks[b, 0] = row.n_source
                row.n_source += 1
            else:
                budgets[b, 0] = row.budget
                row.n_target += 1
            busy.append(b)
        if not busy:
            return []
        start = time.perf_counter()
        logits = self._forward(buffer, tokens, kinds, ranks, budgets, positions,
                               logits_wanted=True)
        done = [b for b in busy if not slots[b].row.queue]
        if done:
            picked = self._sample(logits[mx.array(done)] if len(done) < B else logits,
                                  [slots[b] for b in done])
            for b, token in zip(done, picked, strict=True):
                slots[b].row.resolve(token)
        else:
            mx.eval([c.keys for c in buffer.caches] + [c.values for c in buffer.caches])
        share = (time.perf_counter() - start) / len(busy)
        for b in busy:
            slots[b].compute += share
        self._report("step", B, 1, len(busy))
        return done

    # -- rows

    def _new_slot(self, item: Item) -> _Slot:
        config = item.config
        made: list[_Row] = []

        def make_engine(template, words, word_ids, context):
            ids, prompt = known_prompt(template, word_ids, words.length)
            made.append(_Row(template, ids, prompt, config.layout == "interleaved"))
            return made[0]

        run = _make_run(self.model, self.tokenizer, item.source, config,
                        make_engine=make_engine, template=self.template(config))
        return _Slot(item, run, made[0], run.events(), [], time.monotonic())

    def _advance(self, slot: _Slot):
        """Run the slot's loop until it waits for a token (False) or ends (True), yielding
        ``(key, event)`` pairs."""
        for event in slot.events:
            if event is PENDING:
                return False
            slot.collected.append(event)
            yield slot.item.key, event
        return True

    def _finish(self, slot: _Slot) -> Finished:
        events = tuple(slot.collected)
        trace = Trace(slot.config.settings(self.name, engine=ENGINE_NAME),
                      source_words(slot.run, events), events)
        return Finished(slot.item.key, trace, slot.started, time.monotonic(), slot.compute)

    def _alone(self, item: Item):
        """A sentence the rows do not take (its prompt does not fit the context, or its
        config is not batchable): decoded on its own, as ``translate`` does."""
        from .decoder import translate

        started = time.monotonic()
        clock = time.perf_counter()
        trace = translate(self.model, self.tokenizer, item.source, item.config,
                          model_id=self.name)
        for event in trace.events:
            yield item.key, event
        return Finished(item.key, trace, started, time.monotonic(),
                        time.perf_counter() - clock)

    def run(self, items: Sequence[Item]) -> Iterator:
        """Yields ``(key, event)`` pairs as the loops go, and a :class:`Finished` per
        item when it ends."""
        # Longest first: the sentences left for the last rows are the short ones, so the
        # batch stays full longer (the order of the results does not change).
        pending = deque(sorted(items, key=lambda item: -_length(item.source)))
        B = min(self.batch_size, len(pending))
        if B == 0:
            return
        self.buffer = BatchBuffer(self.n_layers, B)
        slots: list[_Slot | None] = [None] * B
        # Sentences prefilled together, waiting for a free row: (buffer, its row, slot).
        # A row frees one at a time; prefilling a quarter of the batch at once costs
        # far less than as many one-row prefills.
        ready: deque = deque()
        group = max(1, B // 4)
        while True:
            free = [b for b in range(len(slots)) if slots[b] is None]
            for b in free:
                if not ready and pending:
                    yield from self._prefill(pending, max(group, len(free)), ready)
                if not ready:
                    break
                buffer, row, slot = ready.popleft()
                self.buffer.splice(buffer, [(row, b)])
                slots[b] = slot
            if not any(slots):
                return
            if not pending and not ready and None in slots:  # none left to refill: shrink
                keep = [b for b, s in enumerate(slots) if s is not None]
                self.buffer.keep_rows(keep)
                slots = [slots[b] for b in keep]
            resolved = self._step(slots)
            for b in resolved:
                slot = slots[b]
                ended = yield from self._advance(slot)
                if ended:
                    yield self._finish(slot)
                    slots[b] = None
                    self.buffer.clear(b)
            self.buffer.compact()

    def _prefill(self, pending: deque, n: int, ready: deque):
        """Start the loops of up to ``n`` pending items; those that wait for their first
        token are prefilled together and queued in ``ready``. Items the rows do not take,
        or that end before any token, are done here (their events and Finished yielded)."""
        started: list[_Slot] = []
        while pending and len(started) < n:
            item = pending.popleft()
            slot = self._new_slot(item) if batchable(item.config) else None
            # The rows prefill the whole prompt: one longer than the context goes alone.
            if slot is None or slot.row.prompt >= self.context:
                yield (yield from self._alone(item))
                continue
            ended = yield from self._advance(slot)
            if ended:
                yield self._finish(slot)
                continue
            started.append(slot)
        if started:
            buffer = self._join(started)
            ready.extend((buffer, j, slot) for j, slot in enumerate(started))


def _length(source) -> int:
    return len(source.split()) if isinstance(source, str) else len(source)


def decode_items(model, tokenizer, items: Sequence[Item], *, batch_size: int = 8,
                 model_id: str | None = None, on_forward: Callable | None = None) -> Iterator:
    """Decode ``items`` (each with its own config: k, layout, system may differ from row to
    row) in batches of up to ``batch_size`` rows; yields ``(key, event)`` pairs as the
    loops go and a :class:`Finished` for each item as it ends (in the order they end)."""
    items = list(items)
    for i, item in enumerate(items):
        if not isinstance(item, Item):
            raise TypeError(f"items[{i}]: expected a simulref.batch.Item, got {item!r}")
        check_sources([item.source])
    batch = _Batch(model, tokenizer, batch_size, model_id, on_forward)
    return batch.run(items)


def decode_batch(model, tokenizer, sources, config: DecodeConfig | None = None, *,
                 batch_size: int = 8, model_id: str | None = None,
                 on_forward: Callable | None = None, **options) -> Iterator:
    """:func:`decode_items` over ``sources``, one config for all (keys: the positions in
    ``sources``)."""
    config = DecodeConfig.of(config, **options)
    sources = check_sources(sources)
    check_batch_size(batch_size)
    return decode_items(model, tokenizer, [Item(i, s, config) for i, s in enumerate(sources)],
                        batch_size=batch_size, model_id=model_id, on_forward=on_forward)


def stream_batch(model, tokenizer, sources, config: DecodeConfig | None = None, *,
                 batch_size: int = 8, **options) -> Iterator[tuple[int, object]]:
    """``(index, event)`` pairs of every sentence as they happen, the sentences decoded
    in batches of up to ``batch_size`` (``index``: the position of the sentence in
    ``sources``). Options as :func:`simulref.stream`."""
    for item in decode_batch(model, tokenizer, sources, config, batch_size=batch_size,
                             **options):
        if not isinstance(item, Finished):
            yield item


def translate_batch(model, tokenizer, sources, config: DecodeConfig | None = None, *,
                    batch_size: int = 8, model_id: str | None = None,
                    **options) -> list[Trace]:
    """The traces of ``sources`` (in their order), decoded in batches of up to
    ``batch_size`` sentences: the same traces as ``translate`` gives one at a time (greedy
    decoding; the engine recorded is ``"batched"``). Sources must be known up front (str or
    sequences of words). Layouts ``group`` and ``interleaved`` go in rows; a ``reencode``
    config, or a sentence whose prompt does not fit the context, is decoded alone."""
    traces: dict[int, Trace] = {}
    for item in decode_batch(model, tokenizer, sources, config, batch_size=batch_size,
                             model_id=model_id, **options):
        if isinstance(item, Finished):
            traces[item.key] = item.trace
    return [traces[i] for i in range(len(traces))]
