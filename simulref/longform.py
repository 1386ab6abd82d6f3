"""Long-form decoding: an unbounded word stream translated as one run, at bounded memory.

``stream_longform(model, tokenizer, words, ...)`` yields the decoder's usual events
(:mod:`simulref.trace`: Read, Write, DroppedEos, BlankRun, Finish; no SourceEnd; indices
count over the whole stream) plus :class:`SentenceDone` when a sentence pair is complete
and :class:`Evicted` when old pairs leave the cache. :class:`Longform` is the same run as
an object whose state (context size, positions, finished sentences) can be looked at
between events. See docs/longform.md, "Context, eviction and positions".

How it drives the ordinary decoder (:mod:`simulref.decoder`, unchanged): the words go
into a :class:`~simulref.decoder.Feed` that only ends when the input does, one word each
time the decoder asks (so a list and a generator of the same words give the same run).
In one cache, with group positions as in short-form:

- **Turns** (``turns=True``, the default): the sentence being translated is the short-form
  prompt's user and assistant turn, in the group layout, and the finished pairs are the
  conversation before it, in the chat template's own order (user: a sentence; assistant:
  its translation, as written). When a sentence's first word is read, the turn before
  it leaves the group layout: its source words and its whole target group are trimmed
  from the cache (``engine.restart``) and the pair goes in again as one chronological
  chunk of the source group, with the new word: its words, the suffix, the header, the
  target tokens written, the close of the assistant turn and the next user header
  (:class:`~simulref.prompt.TurnBreak`). That costs one prefill of the pair's tokens per
  sentence. The new turn's target group then starts afresh (``target_start="auto"``: at
  the source tokens read when it first writes), so each sentence is decoded as in
  short-form, with the conversation so far in place of the bare prefix. Once a sentence
  is settled (the next one's first word arrived, or the input ended), its user turn's
  suffix is read alone (a SourceEnd: the source gives ``loop.TURN_END``) before its tail
  is written, as a short-form live source's at its end. Up to ``max_history`` (default
  0) finished pairs stay in the conversation: on Qwen 0.5B each pair kept costs BLEU
  (docs/longform.md, "How many pairs stay").
- **One turn** (``turns=False``): one user turn holds the whole stream (source group) and
  one assistant turn the whole target (target group). Qwen 0.5B ends its turn after the
  first sentence and writes nothing more (its EOS is dropped at every later word); kept
  to measure that.

- **Sentences**: :class:`~simulref.segment.SentenceSplitter` as words arrive, plus a cut
  after ``max_sentence_words`` words (an unpunctuated feed must not grow one sentence
  without bound).
- **Policy across sentences**: the configured policy (wait-k, or Confidence, which looks
  at the model as in short-form; LocalAgreement is refused) runs *per sentence*: it is
  asked with the words read of the current sentence and the words written since that
  sentence's first word was read. Once the next sentence's first word has arrived (the
  boundary is settled), the current sentence is complete for the policy (``source_done``):
  the tail is written as in short-form until the model ends it with EOS (dropped; the next
  word is read) or writes ``2 n + 10`` words for its ``n`` (the decoder's runaway guard,
  per sentence), and only then is the next sentence read.
- **Alignment**: the target words (and tokens) of sentence ``s`` are those written after
  its first word was read and before the next sentence's first word was read. By the
  policy above that is each sentence's own translation, tail included.
- **Eviction** (:mod:`simulref.evict`): when a new sentence starts and the context (prefix
  + source read + assistant header + target) passes ``context_budget`` tokens, whole pairs
  go, oldest first, until it is at most ``evict_to`` (and, whatever the budget, until at
  most ``max_history`` finished pairs are left); the prefix and the header stay, and
  so do the sentence being read and the previous pair (its last token is about to be fed
  again). With turns the finished pairs are all in the source group (the conversation),
  so eviction removes the oldest pairs' chunks from the start of it: what stays is a
  conversation that starts at the oldest kept pair.
"""

# What this module relies on in the decoder and engines (one hook, loop.TURN_END; a change
# there must keep these, or give a hook): ``decoder._make_run`` and, on the _Run it
# returns, ``policy`` (replaced by _SentencePolicy, whose ``guards_words_ahead`` turns
# the loop's stream-wide runaway guard off: it guards per sentence), ``word_tokens``
# (the turn before read again with a sentence's first word), ``source`` (replaced by
# _SentenceSource, which gives TURN_END), ``source_tokens``
# (lowered by an eviction), ``read``, ``written``, ``template`` and ``engine``; on the engine
# (IncrementalEngine / FusedEngine) ``fed`` (evicted tokens deleted), ``caches``,
# ``shared`` and ``restart``; and that between two events, just after a Read, the engine holds no
# pending token (the last fed token is out of the cache, to be fed again).

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from .config import DecodeConfig
from .decoder import NEED_INPUT, Feed, _make_run
from .engine import FusedEngine, IncrementalEngine
from .evict import METHODS, Evictor
from .limits import guard_words
from .loop import TURN_END
from .policy import READ, is_agreement
from .prompt import discover_turn_break
from .segment import SentenceSplitter
from .trace import DroppedEos, Finish, Read, SourceEnd, Write

DEFAULT_BUDGET = 1024
DEFAULT_SENTENCE_WORDS = 64
# Finished pairs kept in the conversation. 0: on Qwen 0.5B (postgres-en-fr, k = 3, 50
# sentences in documents of 10) every pair kept costs BLEU: 0 pairs 25.5 (short-form
# 25.7), 1 pair 18.2, 2 pairs 16.3, all the budget holds 19.5 (docs/longform.md).
DEFAULT_HISTORY = 0


@dataclass(frozen=True)
class SentenceDone:
    """Sentence ``index`` of the stream and the target aligned to it are complete:
    ``source_start`` / ``target_start`` are the stream indices of its first source word
    and first aligned target word."""

    index: int
    source_start: int
    source_words: tuple[str, ...]
    target_start: int
    target_words: tuple[str, ...]
    t: float = 0.0

    @property
    def source(self) -> str:
        return " ".join(self.source_words)

    @property
    def target(self) -> str:
        return " ".join(self.target_words)


@dataclass(frozen=True)
class Evicted:
    """Sentence pairs ``first .. last`` left the cache: ``source_tokens`` and
    ``target_tokens`` tokens of each group, by ``method``; ``context`` tokens are kept.
    (With turns the finished pairs are in the source group, translations included.)"""

    first: int
    last: int
    source_tokens: int
    target_tokens: int
    method: str
    context: int
    t: float = 0.0


@dataclass
class _Pair:
    """Bookkeeping of one sentence: where it starts and how many tokens it holds."""

    source_start: int  # stream index of its first word
    written_before: int  # target words written when its first word was read
    target_first: int  # index into engine.fed of its first target token (one turn)
    ids: list[int] = field(default_factory=list)  # its words' ids, as read
    history: int = 0  # (turns) its tokens in the conversation, once the turn is over
    words: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    evicted: bool = False
    closed: bool = False  # (turns) its user turn's suffix is read (ids holds it)


class _SentencePolicy:
    """The configured policy asked per sentence (see the module docstring). An observing
    policy (Confidence) is asked the same way, and its look's candidate passed on."""

    # The loop's runaway guard counts the whole stream; per sentence, it is here.
    guards_words_ahead = True

    def __init__(self, base, session: Longform):
        self.base = base
        self.session = session
        self.name = getattr(base, "name", type(base).__name__)
        self.observes = getattr(base, "observes", False)

    def decide(self, read: int, written: int, source_done: bool,
               source_length: int | None = None, candidate=None):
        session = self.session
        look = {} if candidate is None else {"candidate": candidate}
        if source_done or not session.pairs:
            return self.base.decide(read, written, source_done, source_length, **look)
        if session.turn_to_close:  # the sentence is over: its suffix is read first
            return READ
        pair = session.pairs[-1]  # the sentence of the last word read
        r = read - pair.source_start
        w = written - pair.written_before
        closed = session.next_sentence_arrived
        if w >= guard_words(r):  # the runaway guard, per sentence: read on
            return READ
        return self.base.decide(r, w, closed, r if closed else None, **look)


class _SentenceSource:
    """The run's source (the Feed's words) with the sentences' ends in it (turns): once a
    sentence is over, the next read is its user turn's suffix, alone (TURN_END), as a
    short-form live source's at its end, so its tail is written after it, as in
    short-form."""

    def __init__(self, inner, session: Longform):
        self.inner = inner
        self.session = session
        self.length = inner.length
        self.known = inner.known

    def next(self):
        if self.session.turn_to_close:
            return TURN_END
        return self.inner.next()


def check_config(config: DecodeConfig) -> None:
    """The decode options a long-form run refuses (ValueError naming the option); pure,
    so the command line asks before the model loads."""
    if config.layout != "group":
        raise ValueError(f"layout: long-form decoding needs the 'group' layout, got "
                         f"{config.layout!r}")
    if config.engine not in ("auto", "fused", "incremental"):
        raise ValueError(f"engine: long-form decoding runs 'auto', 'fused' or "
                         f"'incremental', got {config.engine!r}")
    if is_agreement(config.the_policy()):
        raise ValueError("policy: LocalAgreement does not run long-form (its "
                         "re-translations span one sentence's source); use wait-k or "
                         "Confidence")
    if config.max_new_words is not None or config.stop_at_first_eos:
        raise ValueError("max_new_words, stop_at_first_eos: not for a long-form run "
                         "(the stream decides when it ends)")


class Longform:
    """One long-form run over ``words`` (a str, a sequence or any iterable of words,
    pulled one at a time as the decoder asks). :meth:`events` yields the events.

    ``context_budget``: tokens of context (prefix, source read, header, target) above
    which old pairs are evicted when a sentence starts; ``evict_to`` (default 3/4 of the
    budget): what eviction brings it down to. ``eviction``: ``"reprefill"`` (exact) or
    ``"rotate"`` (fast; see :mod:`simulref.evict`). ``max_sentence_words``: a sentence
    is cut after that many words. ``sentence_starts``: the stream indices of the
    sentences' first words, when they are known (a dataset's documents); the splitter
    and the cut are then not used. ``max_history``: finished pairs kept in the context
    (None: as many as the budget holds). ``turns``: each sentence pair a chat turn (default),
    or the whole stream in one turn (see the module docstring). Decode options as for
    :func:`simulref.decoder.stream` (group layout; engine ``auto``, ``fused`` or
    ``incremental``).
    """

    def __init__(self, model, tokenizer, words, config: DecodeConfig | None = None, *,
                 context_budget: int = DEFAULT_BUDGET, evict_to: int | None = None,
                 eviction: str = "reprefill",
                 max_sentence_words: int = DEFAULT_SENTENCE_WORDS,
                 sentence_starts=None, turns: bool = True,
                 max_history: int | None = DEFAULT_HISTORY,
                 on_forward: Callable | None = None, **options):
        config = DecodeConfig.of(config, **options)
        if not isinstance(turns, bool):
            raise TypeError(f"turns: expected a bool, got {turns!r}")
        if sentence_starts is not None:
            sentence_starts = _check_starts(sentence_starts)
        _check_positive("context_budget", context_budget)
        if evict_to is None:
            evict_to = context_budget * 3 // 4
        _check_positive("evict_to", evict_to)
        if evict_to > context_budget:
            raise ValueError(f"evict_to: expected at most context_budget "
                             f"({context_budget}), got {evict_to}")
        _check_positive("max_sentence_words", max_sentence_words)
        if max_history is not None and (isinstance(max_history, bool) or
                                        not isinstance(max_history, int) or max_history < 0):
            raise ValueError(f"max_history: expected None or an int >= 0, got "
                             f"{max_history!r}")
        self.max_history = max_history
        if eviction not in METHODS:
            raise ValueError(f"eviction: expected one of {METHODS}, got {eviction!r}")
        check_config(config)
        if isinstance(words, str):
            words = words.split()
        elif isinstance(words, bytes) or not isinstance(words, Iterable):
            raise TypeError(f"words: expected a str or an iterable of words, got "
                            f"{type(words).__name__}")
        self.config = config
        self.context_budget = context_budget
        self.evict_to = evict_to
        self.max_sentence_words = max_sentence_words
        self._words = iter(words)
        self._feed = Feed()
        self._run = _make_run(model, tokenizer, self._feed, config, on_forward)
        engine = self._run.engine
        if not isinstance(engine, (IncrementalEngine, FusedEngine)) or \
                engine.name not in ("incremental", "fused"):
            raise ValueError(f"engine: long-form decoding cannot run {engine.name!r}")
        self._run.policy = _SentencePolicy(self._run.policy, self)
        self._run.source = _SentenceSource(self._run.source, self)
        self.turns = turns
        if turns:
            turn_break = discover_turn_break(tokenizer, self._run.template.chat_format)
            self._close, self._open = turn_break.ids(tokenizer)
            self._run.word_tokens = self._word_tokens
        self.evictor = Evictor(model, engine.caches, eviction)
        self._splitter = SentenceSplitter()
        # Known sentence boundaries (a dataset's documents): they replace the splitter.
        self._known_starts = None if sentence_starts is None else frozenset(sentence_starts)
        self._starts: list[int] = []  # stream index of each sentence's first word
        self._arrived = 0
        self._ended = False  # the input is over
        self.pairs: list[_Pair] = []  # every sentence read into, in order
        self.sentences: list[SentenceDone] = []  # the finished ones
        self.source_ids = list(self._run.template.prefix_ids)  # the cache's source, in order
        self.prefix = len(self.source_ids)
        self.header = len(self._run.template.header_ids)
        self.peak_context = 0
        self.peak_slots = 0
        self.peak_position = 0

    # -- what can be looked at between events

    @property
    def engine(self) -> str:
        return self._run.engine.name

    @property
    def eviction(self) -> str:
        """The eviction method that runs (``rotate`` may have fallen back)."""
        return self.evictor.method

    @property
    def context(self) -> int:
        """Tokens of context now: prefix + source read + header + target fed."""
        return self._run.source_tokens + len(self._run.engine.fed)

    @property
    def slots(self) -> int:
        """Slots in the KV cache now."""
        return self._run.engine.shared.length

    @property
    def max_position(self) -> int:
        """The largest RoPE position in use (either group)."""
        shared = self._run.engine.shared
        target = 0 if shared.target_start is None else shared.target_start + shared.n_target
        return max(shared.n_source, target)

    @property
    def turn_to_close(self) -> bool:
        """(turns) The sentence of the last word read is over and its user turn's suffix
        is not read yet: the decoder's next read is the suffix (a SourceEnd)."""
        return self.turns and bool(self.pairs) and not self.pairs[-1].closed and \
            self.next_sentence_arrived

    @property
    def next_sentence_arrived(self) -> bool:
        """Whether the sentence of the last word read is known to be over."""
        return len(self._starts) > len(self.pairs) or self._ended

    def settings(self, model_id: str):
        """The trace settings of this run (long-form options in ``extra``)."""
        extra = dict(longform=True, turns=self.turns, max_history=self.max_history,
                     context_budget=self.context_budget,
                     evict_to=self.evict_to, eviction=self.evictor.method,
                     max_sentence_words=self.max_sentence_words)
        if self.evictor.fallback:
            extra["eviction_fallback"] = self.evictor.fallback
        return self.config.settings(model_id, engine=self.engine, **extra)

    # -- the run

    def _arrive(self) -> bool:
        """Pull the next word into the feed; False once the input is over."""
        try:
            word = next(self._words)
        except StopIteration:
            self._ended = True
            return False
        if not isinstance(word, str):
            raise TypeError(f"words: expected str words, got {word!r}")
        opened = not self._starts
        if self._known_starts is not None:
            opened = opened or self._arrived in self._known_starts
        else:
            if len(self._splitter.open_words) >= self.max_sentence_words:
                self._splitter.finish()
                opened = True
            if self._splitter.push(word):
                opened = True
        if opened:
            self._starts.append(self._arrived)
        self._arrived += 1
        self._feed.push(word)
        return True

    def events(self) -> Iterator:
        run = self._run
        engine = run.engine
        last = None
        for event in run.events():
            if event is NEED_INPUT:
                if not self._ended:
                    self._arrive()  # the decoder asks again, maybe the sentence is over
                    continue
                # Asked again with the input over: the last sentence's suffix is read
                # (turns) and its tail written (EOS, or its guard).
                if self.pairs:
                    yield self._done(len(self.pairs) - 1)
                    reason = "eos" if isinstance(last, DroppedEos) else "max_new_words"
                else:
                    reason = "empty_source"
                yield Finish(reason, time.monotonic())
                return
            starts = False  # this read starts a sentence
            if isinstance(event, Read):
                starts = len(self.pairs) < len(self._starts) and \
                    self._starts[len(self.pairs)] == event.source_index
                if starts:
                    if self.pairs:
                        yield self._done(len(self.pairs) - 1)
                    self.pairs.append(_Pair(event.source_index, run.written,
                                            max(len(engine.fed), self.header)))
                self._account(event, starts)
            elif isinstance(event, Write):
                self.pairs[-1].targets.append(event.word)
            elif isinstance(event, SourceEnd):  # (turns) the sentence's user turn is over
                pair = self.pairs[-1]
                pair.ids.extend(event.token_ids)
                pair.closed = True
                self.source_ids.extend(event.token_ids)
            elif isinstance(event, Finish) and self.pairs:
                yield self._done(len(self.pairs) - 1)  # context_limit: a bug, but say so
            last = event
            self._measure()
            yield event
            if starts:  # the pair before it is complete: evict now, if over budget
                evicted = self._maybe_evict()
                if evicted is not None:
                    yield evicted

    def _word_tokens(self, index: int, word: str) -> tuple[int, ...]:
        """The ids read for stream word ``index`` (turns): a later sentence's first word is
        the first of a new user turn, read after the turn before it (:meth:`_end_turn`)."""
        template = self._run.template
        if self.pairs and len(self._starts) > len(self.pairs) and \
                self._starts[len(self.pairs)] == index:
            return (*self._end_turn(), *template.word_ids(0, word))
        return tuple(template.word_ids(index, word))

    def _end_turn(self) -> tuple[int, ...]:
        """Take the last sentence's turn out of the cache (its words and its target group)
        and return it as the conversation's next chunk: the words, the suffix, the header,
        the target tokens fed (every token written, blank runs included: what the model
        wrote), the close and the next user header."""
        run, template = self._run, self._run.template
        pair = self.pairs[-1]
        fed = run.engine.fed
        target = fed[len(template.header_ids):] if fed else []
        suffix = () if pair.closed else template.suffix_ids  # (read with its SourceEnd)
        chunk = (*pair.ids, *suffix, *template.header_ids, *target,
                 *self._close, *self._open)
        keep = run.source_tokens - len(pair.ids)  # the prefix and the conversation
        run.engine.restart(keep)
        run.source_tokens = keep
        del self.source_ids[keep:]
        pair.history = len(chunk)
        return chunk

    def _account(self, event: Read, starts: bool) -> None:
        pair = self.pairs[-1]
        pair.words.append(event.word)
        ids = event.token_ids
        if starts and self.turns and len(self.pairs) > 1:
            ids = ids[self.pairs[-2].history:]  # (the turn before, as a chunk of history)
        pair.ids.extend(ids)
        self.source_ids.extend(event.token_ids)

    def _measure(self) -> None:
        self.peak_context = max(self.peak_context, self.context)
        self.peak_slots = max(self.peak_slots, self.slots)
        self.peak_position = max(self.peak_position, self.max_position)

    def _done(self, index: int) -> SentenceDone:
        pair = self.pairs[index]
        done = SentenceDone(index, pair.source_start, tuple(pair.words),
                            pair.written_before, tuple(pair.targets), time.monotonic())
        self.sentences.append(done)
        return done

    def _maybe_evict(self) -> Evicted | None:
        """At the first read of a new sentence: evict whole old pairs while the context is
        over budget, or while more than ``max_history`` finished pairs are kept (see the
        module docstring for what always stays)."""
        kept = sum(not p.evicted for p in self.pairs) - 1  # finished pairs in the cache
        over = kept - (kept if self.max_history is None else self.max_history)
        over_budget = self.context > self.context_budget
        if not over_budget and over <= 0:
            return None
        run, engine = self._run, self._run.engine
        shared = engine.shared
        # Pairs that may go: not the current one, and (one turn) none holding a target
        # token past the cache (the last fed token is out of it until it is fed again).
        first = next(i for i, p in enumerate(self.pairs) if not p.evicted)
        chosen, s_n, t_n, context = [], 0, 0, self.context
        for i in range(first, len(self.pairs) - 1):
            pair, following = self.pairs[i], self.pairs[i + 1]
            if (not over_budget or context <= self.evict_to) and len(chosen) >= over:
                break
            if self.turns:  # the pair is a chunk of the conversation (source group)
                source, tokens = pair.history, 0
            else:
                if following.target_first > shared.n_target:
                    break
                source, tokens = len(pair.ids), following.target_first - pair.target_first
            chosen.append(i)
            s_n += source
            t_n += tokens
            context -= source + tokens
        if not chosen:
            return None
        head = max(0, min(self.header, shared.n_target))  # the header, once it is fed
        self.evictor.evict((self.prefix, s_n), (head, t_n),
                           self.source_ids[: shared.n_source], engine.fed[: shared.n_target])
        del self.source_ids[self.prefix : self.prefix + s_n]
        del engine.fed[head : head + t_n]
        run.source_tokens -= s_n
        for i in chosen:
            self.pairs[i].evicted = True
        for pair in self.pairs[chosen[-1] + 1:]:
            pair.target_first -= t_n
        return Evicted(chosen[0], chosen[-1], s_n, t_n, self.evictor.method, self.context,
                       time.monotonic())


def stream_longform(model, tokenizer, words, config: DecodeConfig | None = None, *,
                    context_budget: int = DEFAULT_BUDGET, evict_to: int | None = None,
                    eviction: str = "reprefill",
                    max_sentence_words: int = DEFAULT_SENTENCE_WORDS, turns: bool = True,
                    max_history: int | None = DEFAULT_HISTORY,
                    on_forward: Callable | None = None, **options) -> Iterator:
    """Translate an unbounded stream of ``words``; yields the events of :class:`Longform`
    (arguments are checked here, not on the first ``next()``)."""
    return Longform(model, tokenizer, words, config, context_budget=context_budget,
                    evict_to=evict_to, eviction=eviction,
                    max_sentence_words=max_sentence_words, turns=turns,
                    max_history=max_history, on_forward=on_forward, **options).events()


def translate_document(model, tokenizer, document, config: DecodeConfig | None = None,
                       **options):
    """Decode a :class:`~simulref.documents.SourceDocument` as one long-form stream, its
    sentence boundaries taken from the dataset (not the splitter), and return
    ``(longform_metrics.Document, Longform)``: the output words with their delays (source
    words of the document read when each was written), ready for
    :func:`~simulref.longform_metrics.longform_scores`."""
    starts = [offset for offset, _ in document.clock]
    session = Longform(model, tokenizer, document.text, config, sentence_starts=starts,
                       **options)
    words, delays, read = [], [], 0
    for event in session.events():
        if isinstance(event, Read):
            read = event.source_index + 1
        elif isinstance(event, Write):
            words.append(event.word)
            delays.append(read)
    return document.output(words, delays), session


def _check_starts(starts) -> list[int]:
    if isinstance(starts, (str, bytes)) or not isinstance(starts, Iterable):
        raise TypeError(f"sentence_starts: expected word indices, got {starts!r}")
    out = list(starts)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in out) or \
            out != sorted(set(out)):
        raise ValueError(f"sentence_starts: expected increasing word indices >= 0, "
                         f"got {out!r}")
    return out


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
