"""Engines: how tokens reach the model, apart from the read/write loop that decides them.

The loop (:mod:`simulref.decoder`) owns the policy, word boundaries, EOS handling and the
events. It talks to an engine through four calls:

- ``start(prefix_ids)``: the source prefix (system turn + user header), once;
- ``read(ids)``: one source word was read (its ids, with the end-of-turn suffix on the
  last word);
- ``peek(may_read) -> int``: the token the model predicts next, given the target tokens
  accepted so far and the source read so far (the assistant header goes in first);
- ``accept(token, speculate, may_read, forecast)``: ``token`` (the one ``peek`` gave)
  joins the target; ``speculate`` says the loop expects no read before the next token, so
  the engine may feed that one before the loop looks at it (pipelining); ``forecast`` (a
  :class:`Forecast`) says what the loop will do with the next token, whatever it is.

``may_read`` says whether a read may come between this sample and the next one (the
source is not done): the prefilled engine then feeds the token in two rows.

Engines (all give the same trace for the same inputs; :class:`IncrementalEngine` is the
slow, obviously-correct twin the others are tested against):

``incremental``
    Source chunks fed as they are read; after a read that follows target tokens, the
    token predicted without the new word is dropped, the last target token's cache entry
    trimmed and that token fed again (see docs/decoder.md, "Drop, trim, re-feed").
``reencode``
    The baseline: after such a read the whole cache is rebuilt (source, then target).
``prefilled``
    A source known up front, group layout: the whole source is prefilled in one forward
    at the start. In the group layout source keys never see target keys, so this is the
    cache a word-by-word read builds; a target query's mask hides the source tokens past
    the words read (its *budget*). While a read may follow, each target token goes in two
    rows, budget r and r + 1: when the loop reads one word, the next token is row r + 1's
    sample and row r + 1's cache entry is kept (no trim, no re-feed). Only a second read
    in a row re-feeds. The prefill carries the assistant header too (lanes), and greedy
    steps are pipelined, reads included, the choice between the two rows made on the
    device from the loop's :class:`Forecast` (docs/decoder.md, "Pipelined steps").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .cache import SOURCE, TARGET, lane_plan, make_stream_cache
from .config import is_greedy


@dataclass(frozen=True)
class Forward:
    """One model call, for :func:`simulref.decoder.stream`'s ``on_forward`` hook (tests
    and debugging).

    ``start`` is the cache slot of the chunk's first token (slots past it were trimmed
    before this call); ``tokens`` (an ``mx.array``, possibly still lazy), ``positions``
    and ``kind`` describe the chunk; ``logits`` are the last token's logits the decoder
    samples from (None for source chunks, whose logits are never computed): shape
    (vocab,), or (rows, vocab) for a chunk fed in several rows. ``speculative``: the token
    was fed before the decoder looked at it (pipelining); it may yet be dropped.
    ``visible``: per row, the source tokens the chunk's last query sees (None: every
    source token in the cache). ``context``: per target slot before ``start``, the source
    tokens its cache entry saw (None when every source token fed before it).
    ``fused``: this target chunk went in the same model call as the source chunk reported
    just before it (a fused read).
    """

    start: int
    tokens: object
    positions: tuple
    kind: str
    logits: object | None
    speculative: bool = False
    visible: tuple[int, ...] | None = None
    context: tuple | None = None
    fused: bool = False


# Architectures whose mlx-lm Model.__call__ is the body (``self.model``) then the tied or
# untied head: their logits can be taken at the last position only.
_BODY_THEN_HEAD = ("llama", "qwen2", "qwen3")


def last_position_head(model):
    """``(body, head)`` for mlx-lm models of :data:`_BODY_THEN_HEAD` (their own classes),
    else None. The decoder samples from the last position of a chunk only; applying the
    head there alone saves the rest (the head is a fifth of SmolLM2-135M's weights, and a
    fused read or a two-row header has many positions)."""
    kind = getattr(model, "model_type", None)
    if kind not in _BODY_THEN_HEAD or type(model).__module__ != f"mlx_lm.models.{kind}":
        return None
    body = getattr(model, "model", None)
    if body is None:
        return None
    if getattr(model.args, "tie_word_embeddings", False):
        return body, body.embed_tokens.as_linear
    head = getattr(model, "lm_head", None)
    return None if head is None else (body, head)




@dataclass
class Lookahead:
    """What the loop peeks at: the token the model predicts next, not yet placed in a
    word, and whether it is already in the cache (fed ahead, pipelining) with the lazy
    token sampled after it."""

    token: int | None = None
    in_cache: bool = False
    after: object = None

    sample: object = None  # the lazy array ``token`` was read from (its probability)

    def clear(self) -> None:
        self.token, self.in_cache, self.after, self.sample = None, False, None, None

    def set(self, y) -> int:
        """A freshly sampled token (not fed yet) becomes the one to peek at."""
        self.token, self.in_cache, self.after, self.sample = y.item(), False, None, y
        return self.token

    def advance(self, feed: Callable, token: int, speculate: bool) -> None:
        """``token`` joined the target: the next token is sampled from feeding it (unless
        it was fed ahead already); with ``speculate`` that one is fed too before anyone
        looks at it, and its forward queued (``mx.async_eval``), as mlx_lm.generate does.
        ``feed(ids, speculative=False)`` returns the lazy token sampled after ``ids``."""
        import mlx.core as mx

        y = self.after if self.in_cache else feed([token])
        if speculate:
            self.after = feed(y, speculative=True)
            mx.async_eval(self.after)
            self.in_cache = True
        else:
            self.after, self.in_cache = None, False
        self.token, self.sample = y.item(), y


class _Engine:
    """What every engine shares: the caches, one forward, sampling."""

    name = ""

    def __init__(self, model, template, *, layout: str, target_start, sampler,
                 on_forward: Callable | None):
        self.model = model
        self.template = template
        self.caches = make_stream_cache(model, layout, target_start)
        self.shared = self.caches[0].shared
        self.greedy = is_greedy(sampler)
        self.sampler = sampler
        self.on_forward = on_forward
        self.split = last_position_head(model)
        # (an observing policy) id of each recent sample -> (sample, its lazy probability)
        self.probs: dict | None = None

    def observe(self) -> None:
        """An observing policy runs: keep the probability of every token sampled, for
        :meth:`peek_prob`. Called before ``start``."""
        self.probs = {}

    def peek_prob(self) -> float:
        """The probability of the token :meth:`peek` gave, under the logits it was
        sampled from (softmax; the budget it was sampled at). No forward: those logits
        were computed for the token anyway."""
        if self.probs is None:
            raise AssertionError("decoder: peek_prob() without observe()")
        sample = self._peeked_sample()
        entry = self.probs.get(id(sample))
        if entry is None or entry[0] is not sample:
            raise AssertionError("decoder: no probability kept for the peeked token")
        return float(entry[1].item())

    def _peeked_sample(self):
        return self.ahead.sample

    def take_back_header(self) -> None:
        """Undo the header that a look fed before the first word, when the policy then
        reads: the header goes in again at the next look or write, under the budget of
        that moment, as it would have without the look. (Kept, every header entry but the
        last would stay computed under the budget of the first look, which need not be
        more than one word: Qwen 0.5B then copies the English.)"""
        raise NotImplementedError

    def _last_logits(self, batch):
        """The model on ``batch`` (rows x n); the last position's logits of every row."""
        if self.split is None:
            return self.model(batch, cache=self.caches)[:, -1, :]
        body, head = self.split
        return head(body(batch, cache=self.caches)[:, -1:, :])[:, -1, :]

    def _call(self, tokens, kind: str, visible=None, speculative: bool = False,
              lazy_source: bool = True, context=None, report: bool = True, choice=None):
        """Feed ``tokens`` (1-D, or (rows, n)) as one chunk; the last token's logits of
        every row for a target chunk (shape (rows, vocab)), None for a source chunk.
        ``report=False``: no ``on_forward`` record (the caller reports it later);
        ``choice``: see :meth:`simulref.cache.StreamState.begin`."""
        import mlx.core as mx

        batch = tokens if tokens.ndim == 2 else tokens[None]
        start = self.shared.length
        announced = visible
        if (isinstance(visible, int) and visible == self.shared.n_source
                and batch.shape[0] == 1):
            announced = None  # every source token: no mask array (the n = 1 fast path)
        self.shared.begin(kind, batch.shape[1], visible=announced, choice=choice)
        if kind == SOURCE:
            self.model(batch, cache=self.caches)  # only the cache is wanted: stays lazy
            if not lazy_source:
                # A stream may block on the next word: compute the cache meanwhile.
                mx.async_eval([c.keys for c in self.caches] + [c.values for c in self.caches])
            logits = None
        else:
            logits = self._last_logits(batch)
        if self.on_forward is not None and report:
            rows = None if visible is None else tuple(int(v) for v in
                                                      _last_column(visible, batch))
            shown = None if logits is None else (logits[0] if logits.shape[0] == 1 else logits)
            self.on_forward(Forward(start, batch[0], self.shared.positions(), kind, shown,
                                    speculative, rows, context))
        return logits

    def _sample(self, logits):
        import mlx.core as mx

        if self.greedy:
            y = mx.argmax(logits, axis=-1)
        else:
            y = self.sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        if self.probs is not None:
            picked = mx.take_along_axis(logits, y.reshape(-1, 1), axis=-1)[:, 0]
            self.probs[id(y)] = (y, mx.exp(picked - mx.logsumexp(logits, axis=-1)))
            while len(self.probs) > 8:  # only the last few samples can still be peeked
                del self.probs[next(iter(self.probs))]
        return y

    def _trim(self, n: int) -> None:
        for cache in self.caches:
            cache.trim(n)

    def _header(self) -> list[int]:
        header = list(self.template.header_ids)
        if not header:
            raise ValueError("chat_format: the assistant header tokenizes to nothing")
        return header


def _last_column(visible, batch):
    import numpy as np

    budgets = np.asarray(visible)
    if budgets.ndim == 0:
        return [int(budgets)] * batch.shape[0]
    return budgets[:, -1]


class IncrementalEngine(_Engine):
    """Source chunks as they are read; drop, trim and re-feed after a read (the twin)."""

    name = "incremental"

    def __init__(self, model, template, *, layout: str, target_start, sampler, on_forward,
                 known_source: bool):
        super().__init__(model, template, layout=layout, target_start=target_start,
                         sampler=sampler, on_forward=on_forward)
        self.known_source = known_source
        self.fed: list[int] = []  # target tokens in the cache: header, then words' tokens
        self.stale = False  # source read since the last target token was fed
        self.ahead = Lookahead()
        self.unfed_source: list[int] = []  # read from a known source, not yet fed

    # -- the loop's calls

    def start(self, prefix_ids: Sequence[int]) -> None:
        self._feed_source(prefix_ids)

    def read(self, ids: Sequence[int]) -> None:
        if self.fed and not self.stale:
            # The pending token (and, below it, the last fed token's entry) was computed
            # without this word: drop the one, trim the other, feed it again later.
            self._drop_pending()
            self.stale = True
        self._feed_source(ids)

    def peek(self, may_read: bool = True) -> int:
        if self.ahead.token is not None:
            return self.ahead.token
        if not self.fed:
            header = self._header()
            self.fed.extend(header)
            y = self._feed_targets(header)
        elif not self.stale:
            raise AssertionError("decoder: no pending token although no source was read")
        else:
            y = self._refeed()
        self.stale = False
        return self.ahead.set(y)

    def accept(self, token: int, speculate: bool, may_read: bool = True,
               forecast=None) -> None:
        self.fed.append(token)
        self.ahead.advance(self._feed_targets, token, speculate)

    def take_back_header(self) -> None:
        self._trim(len(self.fed) + self.ahead.in_cache)
        self.fed.clear()
        self.ahead.clear()
        self.stale = False
        self.shared.forget_target_start()

    def restart(self, keep: int) -> None:
        """Long-form (:mod:`simulref.longform`), a new turn: every slot past the first
        ``keep`` goes (the last turn's source words and its whole target group; the first
        ``keep`` are source), and the next target token starts a new target group, its
        header first, as the first turn's did."""
        if keep > self.shared.n_source:
            raise AssertionError("decoder: a restart keeps source slots only")
        self._trim(self.shared.length - keep)
        self.fed.clear()
        self.ahead.clear()
        self.stale = False
        self.shared.forget_target_start()

    # -- model calls

    def _drop_pending(self) -> None:
        self._trim(1 + self.ahead.in_cache)
        self.ahead.clear()

    def _refeed(self):
        return self._feed_targets(self.fed[-1:])

    def _feed_source(self, ids: Sequence[int]) -> None:
        import mlx.core as mx

        if self.known_source:
            # Known source: its forward would stay lazy until the next target token anyway,
            # so words read in a row go in one chunk (same cache, one pass over the weights
            # instead of one per word: prefill of the first read / offline ~2-3x faster).
            self.unfed_source.extend(ids)
            return
        self._call(mx.array(ids, dtype=mx.int32), SOURCE, lazy_source=False)

    def _flush_source(self) -> None:
        import mlx.core as mx

        if self.unfed_source:
            ids, self.unfed_source = self.unfed_source, []
            self._call(mx.array(ids, dtype=mx.int32), SOURCE)

    def _feed_targets(self, ids, speculative: bool = False):
        """Feed target tokens (list of ints, or a lazy 1-element array); returns the lazy
        next token."""
        import mlx.core as mx

        self._flush_source()
        tokens = ids if isinstance(ids, mx.array) else mx.array(ids, dtype=mx.int32)
        return self._sample(self._call(tokens, TARGET, speculative=speculative))


class FusedEngine(IncrementalEngine):
    """A live source: a word read after target tokens goes in one forward with the re-feed
    of the last target token (two rows: the source chunk at its source positions with the
    source-only mask; the target token, left-padded, at its target position, seeing
    everything), written into the one chronological buffer (``StreamState.begin_fused``).
    The same cache and logits as the incremental engine's two forwards, in one pass over
    the weights."""

    name = "fused"

    def __init__(self, model, template, *, target_start, sampler, on_forward):
        super().__init__(model, template, layout="group", target_start=target_start,
                         sampler=sampler, on_forward=on_forward, known_source=False)
        self.held: list[int] | None = None  # read, waiting to go in with the re-feed
    def read(self, ids: Sequence[int]) -> None:
        import mlx.core as mx

        if not self.fed:
            super().read(ids)  # nothing to re-feed yet: a plain source chunk
            return
        if not self.stale:
            self._drop_pending()
            self.stale = True
        if self.held is not None:  # a second read in a row: the first goes alone
            self._call(mx.array(self.held, dtype=mx.int32), SOURCE, lazy_source=False)
        self.held = list(ids)

    def restart(self, keep: int) -> None:
        if self.held is not None:  # (a turn ends after its tail was written: none)
            raise AssertionError("decoder: a restart with a word held back")
        super().restart(keep)

    def _refeed(self):
        import mlx.core as mx

        if self.held is None:
            return super()._refeed()
        ids, self.held = self.held, None
        m, token = len(ids), self.fed[-1]
        tokens = mx.array([ids, [token] * m], dtype=mx.int32)
        start = self.shared.length
        self.shared.begin_fused(m)
        logits = self._last_logits(tokens)[1:]
        if self.on_forward is not None:
            source_positions, target_positions = self.shared.positions()
            self.on_forward(Forward(start, tokens[0], source_positions, SOURCE, None))
            self.on_forward(Forward(start + m, tokens[1, -1:], target_positions[-1:], TARGET,
                                    logits[0], fused=True))
        return self._sample(logits)


def supports_row_offsets(model) -> bool:
    """Whether every attention layer takes its RoPE offset from ``cache.offset`` through
    an ``mx.fast.rope``-based module (which accepts one offset per batch row), as mlx-lm's
    llama, qwen2, qwen3, gemma2 and most others do. Otherwise a fused read cannot give
    its two rows different positions."""
    layers = getattr(model, "layers", None)
    if not layers:
        return False
    return all(hasattr(getattr(layer, "self_attn", None), "rope") for layer in layers)


class ReencodeEngine(IncrementalEngine):
    """The baseline: after a read that follows target tokens, rebuild the whole cache
    (source read so far, then the target so far), contiguous positions, causal mask."""

    name = "reencode"

    def __init__(self, model, template, *, target_start, sampler, on_forward,
                 known_source: bool):
        super().__init__(model, template, layout="interleaved", target_start=target_start,
                         sampler=sampler, on_forward=on_forward, known_source=known_source)
        self.source_ids: list[int] = []  # everything read, prefix included

    def _drop_pending(self) -> None:
        self.ahead.clear()  # the cache is rebuilt anyway

    def _feed_source(self, ids: Sequence[int]) -> None:
        self.source_ids.extend(ids)
        if self.fed:
            return  # rebuilt from scratch before the next target token
        super()._feed_source(ids)

    def _refeed(self):
        import mlx.core as mx

        for cache in self.caches:
            cache.reset()
        self._call(mx.array(self.source_ids, dtype=mx.int32), SOURCE,
                   lazy_source=self.known_source)
        return self._feed_targets(self.fed)


# What the loop does with a sampled token (see :class:`Forecast`).
FEED = "feed"  # it joins the target: the engine feeds it next
READ_FIRST = "read"  # a source word is read first (the token is dropped or starts a word)
FINISH = "finish"  # the run ends there


@dataclass(frozen=True)
class Forecast:
    """What the loop will do with the token sampled after the one it accepts, for every
    value that token may take: told with ``accept`` so that the prefilled engine can
    feed the next step before the host knows the token (pipelining) and feed the right
    alternative (the token and budget a read would give) without waiting for it.

    It restates the loop's rules (:meth:`simulref.loop._Run.events`): EOS ends the run
    or is dropped and a word read; a token that opens a word when the word has content,
    or any token once the word holds ``max_tokens_per_word``, ends the word, after which
    the run finishes (words limit), reads (policy) or writes on. A wrong forecast costs
    time, never a different trace: the engine checks what the loop did before it keeps a
    step fed ahead.
    """

    content: bool  # the word so far has non-space text
    cut: bool  # the word is full: the next token ends it whatever it is
    source_done: bool
    eos_reads: bool  # EOS is dropped and a word read (else the run ends)
    word_end: str  # FEED, READ_FIRST or FINISH: what follows a word that ends with text
    room: bool  # one more token fits in the context
    table: object  # the tokenizer's TokenTable
    eos: frozenset

    def outcome(self, token: int) -> str:
        if token in self.eos:
            return READ_FIRST if self.eos_reads else FINISH
        if self.cut:
            if self.source_done:
                return FINISH
            return self.word_end if self.content else READ_FIRST  # a blank run reads on
        if self.content and self.table.opens_word(token):
            return self.word_end
        return FEED

    def reads(self, tokens, opens, eos):
        """:meth:`outcome` is READ_FIRST, on the device: ``tokens`` a lazy (1,) array,
        ``opens``/``eos`` per-token bool arrays."""
        import mlx.core as mx

        at_eos = eos[tokens]
        if self.cut:
            other = not self.source_done and (not self.content or self.word_end == READ_FIRST)
            ends = mx.full(at_eos.shape, other, dtype=mx.bool_)
        else:
            ends = mx.logical_and(opens[tokens], self.content and self.word_end == READ_FIRST)
        return mx.where(at_eos, mx.array(self.eos_reads), ends)


@dataclass
class _Step:
    """A target forward: the lazy token sampled from row 0 (shape (1,)), row 1's lazy
    logits (two-budget rows) or None, their budgets, and (a step fed ahead) the record
    for ``on_forward``, reported once the step is queued."""

    y: object
    alt_logits: object = None
    budget: int = 0
    alt_budget: int | None = None
    record: Forward | None = None


@dataclass
class _Ahead:
    """A step fed before the host knew the token it feeds (pipelined prefilled engine):
    row 0's sample, or, when ``after_read`` (the loop will read one word first), row 1's
    sample at the next budget, with the entry below it switched to row 1's. Chosen on the
    device (``read_first``); ``token`` and ``after_read`` are filled in once the host
    knows. ``dispatched``: queued for computation (not when the run ends there)."""

    step: _Step
    read_first: object = None
    alt_token: object = None
    token: int = -1
    after_read: bool = False
    dispatched: bool = False
    eos: bool = False  # it fed an EOS (row 1's token can be one): the loop never keeps it
    context: tuple = ()  # the budgets the target slots below it saw (for on_forward)


class PrefilledEngine(_Engine):
    """The whole source prefilled at the start; reads move a budget; two-budget rows.

    With a model whose RoPE takes one offset per row, the first forward also carries the
    assistant header (:func:`simulref.cache.lane_plan`), so the first target token costs
    no forward of its own. With greedy sampling the steps are pipelined: while the host
    waits for a token, the step that feeds it is already built, and it is queued as soon
    as the token is known, unless the run ends there. While a read may follow, that step
    feeds row 0's token (no read) or row 1's (one read: the budget moves on) and keeps the
    matching entry of the step below it, chosen on the device from the token and the
    loop's :class:`Forecast`. A sampler keeps the twin's order of draws: then nothing is
    fed ahead while a read may follow.
    """

    name = "prefilled"

    def __init__(self, model, template, word_ids: Sequence[Sequence[int]], *, target_start,
                 sampler, on_forward):
        super().__init__(model, template, layout="group", target_start=target_start,
                         sampler=sampler, on_forward=on_forward)
        self.word_ids = [list(ids) for ids in word_ids]  # the last with the suffix
        self.ends: list[int] = []  # ends[r]: source tokens of the prefix and r words
        self.source_ids: list[int] | None = None  # not fed yet: it goes in with the header
        self.read_count = 0
        self.fed: list[int] = []  # target tokens in the cache
        self.slot_budgets: list[int] = []  # per target slot: the budget its entry saw
        self.alt = None  # (lazy logits of row r + 1, its budget) of the last forward
        self.kept_row: int | None = None  # row to keep of the last multi-row forward
        self.reads_since_sample = 0
        self.pipelined = self.greedy
        self.ahead = Lookahead()  # (a sampler) fed ahead only once the source is done
        self.token: int | None = None  # (pipelined) the token the loop peeks at next
        self.fed_ahead: _Ahead | None = None  # (pipelined) the step fed before it was known
        self.tables = None  # (pipelined) per-token bools on the device: opens a word, EOS
        self.orphan: _Ahead | None = None  # (pipelined) dropped unqueued; see peek()
        # Rows with their own masks and offsets (two budgets, lanes) need attention that
        # takes a (rows, 1, queries, keys) mask: mlx-lm's llama, qwen2 and qwen3 do (gemma2
        # reshapes queries per KV head group, which such a mask does not fit). Other
        # models feed one row and re-feed after a read.
        self.row_masks = self.split is not None and supports_row_offsets(model)

    @property
    def budget(self) -> int:
        return self.ends[self.read_count]

    def observe(self) -> None:
        # The pipelined steps forecast the loop's choice on the device from the token
        # alone; an observing policy's choice hangs on a probability the host reads, so
        # the steps go one at a time (the two-budget rows still save the re-feed).
        super().observe()
        self.pipelined = False

    # -- the loop's calls

    def start(self, prefix_ids: Sequence[int]) -> None:
        import mlx.core as mx

        ids = list(prefix_ids)
        self.ends = [len(ids)]
        for word in self.word_ids:
            ids += word
            self.ends.append(len(ids))
        if self.row_masks:
            self.source_ids = ids  # fed with the header, in lanes, at the first write
        else:
            self._call(mx.array(ids, dtype=mx.int32), SOURCE)

    def read(self, ids: Sequence[int]) -> None:
        self.read_count += 1
        if not self.fed:
            return  # the header is not in yet: it will see this budget
        if not self.pipelined and self.reads_since_sample == 0:
            if self.ahead.in_cache:  # the speculative step saw the old budget: drop it
                self._trim_target(1)
            self.ahead.clear()
        self.reads_since_sample += 1

    def take_back_header(self) -> None:
        if self.pipelined:
            raise AssertionError("decoder: a look on a pipelined engine")
        self._trim_target(len(self.fed) + self.ahead.in_cache)
        self.fed.clear()
        self.ahead.clear()
        self.alt = None
        self.kept_row = None
        self.reads_since_sample = 0
        self.shared.forget_target_start()

    def peek(self, may_read: bool = True) -> int:
        if not self.fed:
            header = self._header()
            self.shared.start_target_group(self.budget)
            self.fed.extend(header)
            if self.source_ids is not None:
                ids, self.source_ids = self.source_ids, None
                step = self._prefill(ids, header)
            else:
                step = self._feed(header, may_read)
            self.reads_since_sample = 0
            if self.pipelined:
                self.token = step.y.item()
                return self.token
            return self.ahead.set(step.y)
        if not self.pipelined:
            return self._peek_one_at_a_time(may_read)
        if self.reads_since_sample == 0:
            if self.token is None:
                raise AssertionError("decoder: no pending token although no source was read")
            return self.token
        reads, self.reads_since_sample = self.reads_since_sample, 0
        ahead, self.fed_ahead = self.fed_ahead, None
        if ahead is not None and ahead.after_read and reads == 1:
            if ahead.eos:
                # Row 1's token is an EOS: the loop never feeds it. Its step leaves the
                # cache unqueued; if the run goes on, the next forward computes it anyway
                # (its writes are under the cache's later versions) and reports it then.
                self._trim_target(1)
                self.alt = None
                self.orphan = None if ahead.dispatched else ahead
                self.token = ahead.token
                return self.token
            self._keep_ahead(ahead)
            ahead.after_read = False  # the read came: the step fed the token to accept
            self.fed_ahead = ahead
            self.token = ahead.token
            return self.token
        if ahead is not None:
            self._drop_ahead(ahead)
        self.token = self._after_reads(reads, may_read).y.item()
        return self.token

    def accept(self, token: int, speculate: bool, may_read: bool = True,
               forecast: Forecast | None = None) -> None:
        if not self.pipelined:
            self.fed.append(token)
            # Fed ahead only once no read can follow: a step fed ahead while a read may
            # follow would settle the rows of the step below it too early.
            self.ahead.advance(
                lambda ids, speculative=False: self._feed(ids, may_read,
                                                          speculative=speculative).y,
                token, speculate and not may_read)
            return
        import mlx.core as mx

        self.fed.append(token)
        self.token = None
        ahead, self.fed_ahead = self.fed_ahead, None
        if ahead is not None and not ahead.after_read and ahead.token == token:
            self._keep_ahead(ahead)
            step = ahead.step
        else:
            ids = [token]
            if ahead is not None:
                self._drop_ahead(ahead)
                if ahead.after_read:  # the entry below it took row 1's budget: redo it
                    self._trim_target(1)
                    ids = self.fed[-2:]
            step = self._feed(ids, may_read)
            mx.async_eval(step.y)
        if forecast is None or not forecast.room:
            self.token = step.y.item()
            return
        ahead = self.fed_ahead = self._feed_ahead(step, forecast)
        if ahead.read_first is None:
            self.token = step.y.item()
            ahead.token = self.token
        else:
            mx.eval(step.y, ahead.read_first, ahead.alt_token)
            self.token = step.y.item()
            ahead.after_read = bool(ahead.read_first.item())
            ahead.token = ahead.alt_token.item() if ahead.after_read else self.token
            ahead.eos = ahead.token in forecast.eos
            if ahead.after_read:  # the entry below it and this step saw one word more
                self.slot_budgets[-2] = self.ends[self.read_count + 1]
                budget, alt_budget = self._budgets(self.read_count + 1)
                ahead.step.budget = self.slot_budgets[-1] = budget
                # (no word left after that read: row 1 saw what row 0 saw)
                ahead.step.alt_budget = budget if alt_budget is None else alt_budget
        ahead.context = tuple(self.slot_budgets[:-1])
        outcome = forecast.outcome(self.token)
        if (outcome != FINISH and (outcome == READ_FIRST) == ahead.after_read
                and not ahead.eos):
            self._dispatch(ahead)

    # -- pipelined steps

    def _feed_ahead(self, step: _Step, forecast: Forecast) -> _Ahead:
        """Build (not queue) the step that feeds the token ``step`` samples. With two
        rows, whether the loop reads first is decided on the device: it picks the token
        (row 0's or row 1's sample), the entry below it and the budgets."""
        import mlx.core as mx

        if step.alt_logits is None:
            self._settle()
            return _Ahead(self._feed(step.y, False, speculative=True, report=False))
        opens, eos = self._device_tables(forecast, step.alt_logits.shape[-1])
        read_first = forecast.reads(step.y, opens, eos)
        alt_token = mx.argmax(step.alt_logits[None], axis=-1)
        for cache in self.caches:
            cache.keep_where(read_first)
        self.kept_row = None
        tokens = mx.where(read_first, alt_token, step.y).astype(mx.int32)
        return _Ahead(self._feed(tokens, True, speculative=True, report=False,
                                 read_first=read_first), read_first, alt_token)

    def _dispatch(self, ahead: _Ahead) -> None:
        """Queue a step fed ahead (and report it)."""
        import mlx.core as mx

        if ahead.dispatched:
            return
        ahead.dispatched = True
        step = ahead.step
        mx.async_eval(step.y if step.alt_logits is None else [step.y, step.alt_logits])
        if self.on_forward is not None:
            record = step.record
            visible = ((step.budget,) if step.alt_logits is None
                       else (step.budget, step.alt_budget))
            self.on_forward(Forward(record.start, mx.array([ahead.token], dtype=mx.int32),
                                    record.positions, TARGET, record.logits, True, visible,
                                    ahead.context))

    def _keep_ahead(self, ahead: _Ahead) -> None:
        self._dispatch(ahead)
        step = ahead.step
        if step.alt_logits is not None:
            self.alt, self.kept_row = (step.alt_logits, step.alt_budget), 0
        else:
            self.alt, self.kept_row = None, None

    def _drop_ahead(self, ahead: _Ahead) -> None:
        """Forget the step fed ahead (its slot). The entry below it holds the row the
        device chose, so the last forward's alternative row is gone. A step never queued
        is computed all the same (the cache's later versions are built on its writes), so
        it is queued and reported here: ``on_forward`` sees every forward that runs."""
        self._dispatch(ahead)
        self._trim_target(1)
        self.alt = None

    def _device_tables(self, forecast: Forecast, vocab: int):
        import mlx.core as mx
        import numpy as np

        if self.tables is None or self.tables[0].shape[0] != vocab:
            starts = np.zeros(vocab, dtype=bool)
            table = np.asarray(forecast.table.starts[:vocab], dtype=bool)
            starts[: table.shape[0]] = table
            eos = np.zeros(vocab, dtype=bool)
            eos[[t for t in forecast.eos if 0 <= t < vocab]] = True
            self.tables = (mx.array(starts), mx.array(eos))
        return self.tables

    # -- one step at a time (a sampler)

    def _peek_one_at_a_time(self, may_read: bool) -> int:
        if self.ahead.token is not None:
            return self.ahead.token
        if self.reads_since_sample == 0:
            raise AssertionError("decoder: no pending token although no source was read")
        step = self._after_reads(self.reads_since_sample, may_read)
        self.reads_since_sample = 0
        return self.ahead.set(step.y)

    def _after_reads(self, reads: int, may_read: bool) -> _Step:
        """The token after ``reads`` words read since the last sample: row 1's when it saw
        exactly this budget (take its token, keep its cache entry), else the last target
        token fed again at the new budget."""
        if reads == 1 and self.alt is not None and self.alt[1] == self.budget:
            logits, budget = self.alt
            self.kept_row, self.alt = 1, None
            self.slot_budgets[-1] = budget
            return _Step(self._sample(logits[None]))
        self._trim_target(1)
        return self._feed(self.fed[-1:], may_read)

    # -- model calls

    def _prefill(self, ids: list[int], header: list[int]) -> _Step:
        """The first forward: the whole source and the header, in lanes; the header's
        queries see the budget."""
        import mlx.core as mx
        import numpy as np

        budget = self.budget
        plan = lane_plan(len(ids), len(header), self.shared.target_start, budget)
        tokens = np.asarray(ids + header, dtype=np.int32)
        slots = np.asarray(plan.slots)
        batch = mx.array(np.where(slots >= 0, tokens[np.maximum(slots, 0)], 0))
        self.shared.begin_lanes(plan)
        lane, col = plan.last
        if self.split is None:
            logits = self.model(batch, cache=self.caches)[lane : lane + 1, col, :]
        else:
            body, head = self.split
            logits = head(body(batch, cache=self.caches)[lane : lane + 1, col : col + 1, :])
            logits = logits[:, -1, :]
        if self.on_forward is not None:
            source_positions, header_positions = self.shared.positions()
            self.on_forward(Forward(0, mx.array(ids, dtype=mx.int32), source_positions,
                                    SOURCE, None))
            self.on_forward(Forward(len(ids), mx.array(header, dtype=mx.int32),
                                    header_positions, TARGET, logits[0], visible=(budget,),
                                    context=(), fused=True))
        self.slot_budgets.extend([budget] * len(header))
        self.alt = None
        return _Step(self._sample(logits), budget=budget)

    def _settle(self) -> None:
        """Before the cache changes again: every row holds the kept row's last entry."""
        if self.kept_row is not None:
            for cache in self.caches:
                cache.keep(self.kept_row)
            self.kept_row = None

    def _trim_target(self, n: int) -> None:
        self._settle()
        self._trim(n)
        del self.slot_budgets[len(self.slot_budgets) - n:]

    def _budgets(self, read_count: int) -> tuple[int, int | None]:
        """Row 0's budget after ``read_count`` words and row 1's (one word more), None
        when no word is left."""
        nxt = read_count + 1
        return self.ends[read_count], (self.ends[nxt] if nxt < len(self.ends) else None)

    def _feed(self, ids, may_read: bool, speculative: bool = False, report: bool = True,
              read_first=None) -> _Step:
        """Feed target tokens at the current budget; with ``may_read`` (and a word left to
        read) also in a second row whose last token sees one more word. ``read_first`` (a
        lazy bool, a step fed ahead): both rows see one word more when it holds."""
        import mlx.core as mx
        import numpy as np

        if self.orphan is not None:
            orphan, self.orphan = self.orphan, None
            self._dispatch(orphan)
        self._settle()
        tokens = ids if isinstance(ids, mx.array) else mx.array(ids, dtype=mx.int32)
        n = tokens.shape[0]
        budget, alt_budget = self._budgets(self.read_count)
        two = may_read and alt_budget is not None and self.row_masks
        context = tuple(self.slot_budgets) if self.on_forward is not None else None
        if two:
            visible = np.full((2, n), budget, dtype=np.int64)
            visible[1, -1] = alt_budget
            if read_first is None:
                choice = None
            else:  # the budgets one read later (row 1 past the last word sees them all)
                later = self._budgets(self.read_count + 1)
                other = np.full((2, n), later[0], dtype=np.int64)
                other[1, -1] = later[1] if later[1] is not None else later[0]
                choice = (read_first, other)
            logits = self._call(mx.broadcast_to(tokens[None], (2, n)), TARGET,
                                visible=visible, speculative=speculative, context=context,
                                report=report, choice=choice)
            step = _Step(self._sample(logits[:1]), logits[1], budget, alt_budget)
            self.alt = (logits[1], alt_budget)
            self.kept_row = 0  # unless a read switches it to row 1
        else:
            logits = self._call(tokens, TARGET, visible=budget, speculative=speculative,
                                context=context, report=report)
            step = _Step(self._sample(logits[:1]), None, budget, None)
            self.alt = None
        if not report:
            step.record = Forward(self.shared.length - n, tokens, self.shared.positions(),
                                  TARGET, logits if two else logits[0], speculative)
        self.slot_budgets.extend([budget] * n)
        return step
