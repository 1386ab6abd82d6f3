"""The read/write loop: feed source words as the policy asks, generate target words.

:class:`_Run` is the word-by-word loop that :func:`simulref.decoder.stream` and
``translate`` drive (and :mod:`simulref.agreement` builds on), with the source it reads
(:class:`Feed`, :data:`NEED_INPUT`) and the token tables that cut words. See
docs/decoder.md for the full contract; in short:

- The prompt is fed in segments (:mod:`simulref.prompt`): the prefix (system turn + user
  header) at once, each source word when the policy reads it, the end-of-turn suffix with
  the last word, and the assistant header before the first target token. A
  :class:`~simulref.cache.StreamCache` gives each chunk its group positions and mask.
- A target word ends when the model samples a token that starts a new word (its text
  begins with whitespace and the word so far has some non-space text), at EOS, or after
  ``max_tokens_per_word`` tokens. The token that opened the next word was predicted
  before the next source word was read: if the policy reads before that word, the token
  is dropped, the last fed token's cache entry is trimmed, the source is read and the last
  token is fed again, so the first token of every word sees the new source.
- EOS sampled before the source is complete is dropped (a ``DroppedEos`` event) and one
  more word is read (so is a whitespace-only run cut at ``max_tokens_per_word``: a
  ``BlankRun`` event); ``stop_at_first_eos=True`` stops there instead, as the paper's code.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .engine import (
    FEED,
    FINISH,
    READ_FIRST,
    Forecast,
)
from .limits import guard_words
from .policy import READ, WRITE, Candidate, decide
from .trace import BlankRun, DroppedEos, Finish, Look, Read, SourceEnd, Write

EMPTY_SOURCE = "empty_source"  # Finish reason of a source with no words (nothing is written)
# Finish reason of a run whose next read or token would not fit in the model's context.
CONTEXT_LIMIT = "context_limit"


# ---------------------------------------------------------------- token pieces


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:  # bytes without a printable glyph are shifted past 255, in order
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _byte_level_bytes(token: str) -> bytes:
    table = _byte_level_decoder()
    out = bytearray()
    for ch in token:
        byte = table.get(ch)
        out.extend(ch.encode("utf-8") if byte is None else bytes([byte]))
    return bytes(out)


def _spm_bytes(token: str) -> bytes:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])  # byte-fallback piece
    return token.replace("\u2581", " ").encode("utf-8")


@dataclass(frozen=True)
class TokenTable:
    """Per token id: its bytes, whether its text starts with whitespace (it opens a new
    word) and whether it has any non-whitespace text."""

    pieces: tuple[bytes, ...]
    starts: tuple[bool, ...]
    content: tuple[bool, ...]

    def text(self, ids: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in ids).decode("utf-8", errors="replace")

    def piece(self, token: int) -> bytes:
        return self.pieces[token] if token < len(self.pieces) else b""

    def opens_word(self, token: int) -> bool:
        return token < len(self.starts) and self.starts[token]

    def has_content(self, token: int) -> bool:
        return token < len(self.content) and self.content[token]


def _build_token_table(tokenizer) -> TokenTable:
    ids = list(range(len(tokenizer)))
    tokens = tokenizer.convert_ids_to_tokens(ids)
    probe = "".join(tokenizer.convert_ids_to_tokens(
        tokenizer.encode(" a b", add_special_tokens=False)))
    if "\u0120" in probe:  # 'Ġ': byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM)
        pieces = [_byte_level_bytes(t) for t in tokens]
    elif "\u2581" in probe:  # '▁': SentencePiece
        pieces = [_spm_bytes(t) for t in tokens]
    else:  # unknown scheme: decode one token at a time (may lose leading spaces)
        pieces = [tokenizer.decode([i]).encode("utf-8") for i in ids]
    # Whitespace as str.split() sees it, the rule the source side splits words by.
    texts = [p.decode("utf-8", errors="replace") for p in pieces]
    return TokenTable(
        pieces=tuple(pieces),
        starts=tuple(t[:1].isspace() for t in texts),
        content=tuple(bool(t.strip()) for t in texts),
    )


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_table(tokenizer) -> TokenTable:
    """The :class:`TokenTable` of ``tokenizer``, built once per tokenizer object."""
    try:
        table = _TABLES.get(tokenizer)
    except TypeError:  # not weak-referenceable: build every time
        return _build_token_table(tokenizer)
    if table is None:
        table = _TABLES[tokenizer] = _build_token_table(tokenizer)
    return table


# ---------------------------------------------------------------- source


class _NeedInput:
    """The type of :data:`NEED_INPUT` (one instance)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_INPUT"

    def __reduce__(self):
        return "NEED_INPUT"


# Yielded by stream() over a Feed when the policy wants a word that has not been pushed.
NEED_INPUT = _NeedInput()
# What a batched row's engine (simulref.batch) returns from peek() until the batch has
# run the forward that gives its token; the loop yields it up to the batch and asks
# again. The engines of one-at-a-time decoding never return it, so stream() never
# yields it.
class _Pending:
    def __repr__(self) -> str:
        return "PENDING"


PENDING = _Pending()
# What a live source gives once it is over, after its last word was read without the
# end-of-turn suffix: the suffix is read alone (a SourceEnd event).
_END = object()
# What a source that goes on may give between two words (long-form: the sentence read so
# far is over): its user turn's suffix is read alone (a SourceEnd event), as a live
# source's at its end, but the source is not done.
TURN_END = object()


def _check_feed_word(word) -> str:
    if not isinstance(word, str):
        raise TypeError(f"word: expected a str, got {word!r}")
    if word.split() != [word]:
        raise ValueError(f"word: expected one non-empty word without whitespace, got {word!r}")
    return word


class Feed:
    """A source pushed word by word from the caller's own loop, without threads.

    ``stream(model, tokenizer, feed)`` takes each pushed word when its policy reads, with
    the ``last`` flag it was pushed with (no look-ahead: the end-of-turn suffix goes with
    the word pushed ``last=True``). When the policy wants a word that has not been pushed
    yet, the stream yields :data:`NEED_INPUT` instead of blocking: push more, then call
    ``next()`` again (calling it without pushing just yields ``NEED_INPUT`` again).

    ``end()`` says no more words will come. Words still waiting in the feed close the
    source properly (the last of them becomes the last word, the suffix with it); once the
    decoder has read every pushed word, the suffix is read alone (a ``SourceEnd`` event).
    A feed that never had a word is an empty source.
    """

    def __init__(self):
        self._words: list[str] = []  # every word pushed, in order
        self._taken = 0  # how many of them the decoder has read
        self._last_at: int | None = None  # index of the last word, once known
        self._ended = False
        self._bound = False  # a feed drives one stream only

    @property
    def words(self) -> tuple[str, ...]:
        """Every word pushed so far."""
        return tuple(self._words)

    @property
    def complete(self) -> bool:
        """No more words will come (a word was pushed ``last=True``, or ``end()``)."""
        return self._ended

    @property
    def waiting(self) -> int:
        """Words pushed but not yet read by the decoder."""
        return len(self._words) - self._taken

    def push(self, word: str, last: bool = False) -> None:
        """Add the next source word; ``last=True`` if no word follows it."""
        if not isinstance(last, bool):
            raise TypeError(f"last: expected a bool, got {last!r}")
        if self._ended:
            raise ValueError(f"Feed.push({word!r}): the source already ended "
                             f"({len(self._words)} words); no word can follow")
        self._words.append(_check_feed_word(word))
        if last:
            self._last_at, self._ended = len(self._words) - 1, True

    def end(self) -> None:
        """No more words (see the class docstring)."""
        if self._ended:
            return
        if self.waiting:
            self._last_at = len(self._words) - 1
        self._ended = True

    def _take(self):
        """``(word, is_last)``, :data:`_END` once (every word read, the last without the
        suffix), None when the source is over, or NEED_INPUT."""
        if self._taken < len(self._words):
            index = self._taken
            self._taken += 1
            return self._words[index], index == self._last_at
        if not self._ended:
            return NEED_INPUT
        if self._words and self._last_at is None:
            self._last_at = len(self._words) - 1  # its suffix goes now, alone
            return _END
        return None

    def __repr__(self) -> str:
        state = "complete" if self._ended else "open"
        return f"Feed({len(self._words)} words, {self._taken} read, {state})"


class _Source:
    """Source words one at a time, each with whether it is the last.

    A str is split on whitespace; a sequence is taken as words (the last one known, the
    end-of-turn suffix goes with it); any other iterable is read lazily and may block
    while the speaker is silent. A word of a stream is read as soon as it arrives (no
    look-ahead), so none is known to be the last: when the input ends, :data:`_END` says
    so once and the suffix is read alone.
    """

    def __init__(self, source):
        self.feed = None
        if isinstance(source, Feed):
            if source._bound:
                raise ValueError("source: this Feed already drives another stream")
            source._bound = True
            self.feed, self.length = source, None
            self.known = source._words  # the words pushed so far (grows)
            return
        if isinstance(source, str):
            source = source.split()
        elif isinstance(source, bytes) or not isinstance(source, Iterable):
            raise TypeError(f"source: expected a str, a sequence of words or an iterable of "
                            f"words, got {type(source).__name__}")
        self.length = len(source) if isinstance(source, Sequence) else None
        self.known = source if self.length is not None else None
        self._it = iter(source)
        self._given = 0
        self._exhausted = False

    def next(self):
        """``(word, is_last)``, :data:`_END` once when a stream ends after its words, None
        when the source is over, or NEED_INPUT (a Feed with no word waiting)."""
        if self.feed is not None:
            return self.feed._take()
        if self._exhausted:
            return None
        if self.length is not None:
            if self._given == self.length:
                self._exhausted = True
                return None
            self._given += 1
            return next(self._it), self._given == self.length
        try:
            word = next(self._it)
        except StopIteration:
            self._exhausted = True
            return _END if self._given else None
        self._given += 1
        return word, False


# ---------------------------------------------------------------- the loop


class _Run:
    """One translation's state. ``events()`` is the generator behind :func:`stream`; how
    tokens reach the model is the engine's business (:mod:`simulref.engine`)."""

    def __init__(self, engine, template, source: _Source, word_ids, policy, table: TokenTable,
                 eos, max_tokens_per_word, max_new_words, stop_at_first_eos, context: int):
        self.engine = engine
        self.context = context  # slots the model's context holds
        self.template = template
        self.source = source
        self.word_ids = word_ids  # ids of the words of a source known up front
        self.policy = policy
        self.table = table
        self.eos = eos
        self.max_tokens_per_word = max_tokens_per_word
        self.max_new_words = max_new_words
        self.stop_at_first_eos = stop_at_first_eos

        self.read = 0
        self.written = 0
        self.source_done = False
        self.source_tokens = len(template.prefix_ids)  # prefix + words read
        # (long-form) ``word_tokens(index, word) -> ids`` tokenizes the words read in
        # place of the template: a sentence that starts a turn reads the last one with it.
        self.word_tokens = None

    @property
    def caches(self):
        return self.engine.caches

    @property
    def shared(self):
        return self.engine.shared

    # -- steps of the loop

    def _read(self):
        """Read one word; None when the source turns out to be exhausted, NEED_INPUT when
        a Feed has no word yet (nothing changes then)."""
        got = self.source.next()
        if got is NEED_INPUT:
            return got
        if got is None:
            self.source_done = True
            return None
        if got is _END or got is TURN_END:
            ids = tuple(self.template.suffix_ids)
            if not self._fits(len(ids)):
                return CONTEXT_LIMIT
            self.source_tokens += len(ids)
            if ids:  # (a chat format may end the user turn with nothing)
                self.engine.read(ids)
            self.source_done = got is _END
            return SourceEnd(self.read, ids, time.monotonic())
        word, is_last = got
        if self.word_tokens is not None:
            ids = tuple(self.word_tokens(self.read, word))
        else:
            ids = self.word_ids.get(self.read) or tuple(self.template.word_ids(self.read, word))
        if is_last:
            ids += tuple(self.template.suffix_ids)
        if not self._fits(len(ids)):
            return CONTEXT_LIMIT
        self.source_tokens += len(ids)
        self.engine.read(ids)
        event = Read(self.read, word, ids, time.monotonic())
        self.read += 1
        if is_last:
            self.source_done = True
        return event

    def _fits(self, tokens: int) -> bool:
        """Whether ``tokens`` more, and one for the next target token, stay inside the
        model's context. What counts is what the next query sees, the same for every
        engine: the source read so far and the target tokens fed (the prefilled engine
        holds unread source too, but masked: those slots are not part of the sequence)."""
        return self.source_tokens + len(self.engine.fed) + tokens + 1 <= self.context

    def _reads_after_word(self) -> bool:
        """Whether the policy reads once the word being written is written. An observing
        policy that must look first cannot say yet: the bet is on writing (a wrong bet
        costs a dropped step, never a different trace)."""
        if not self.source_done and self._too_far_ahead(self.written + 1):
            return True
        return decide(self.policy, self.read, self.written + 1, self.source_done,
                      self.source.length) is READ

    def _too_far_ahead(self, written: int) -> bool:
        """The runaway guard before the source ends: ``written`` words are as many as the
        guard allows for the words read so far (``limits.guard_words``), so the next one
        waits for a read, whatever the policy says. Count-only policies never get there
        (wait-k writes at most one word per word read); an observing one can, on a model
        that loops confidently ("Voici la traduction en français :" again and again)."""
        if getattr(self.policy, "guards_words_ahead", False):
            return False  # the policy applies the guard in its own counts (long-form)
        return written >= guard_words(self.read)

    def _look_stands(self) -> bool:
        """After a read decided on a look waited for its word: whether it still reads. The
        policy is asked without a look; one that would look again keeps its decision (the
        candidate has not changed), one that answers outright (a long-form sentence just
        closed: write its tail) is followed."""
        return decide(self.policy, self.read, self.written, False,
                      self.source.length) is not WRITE

    def _policy_reads(self, looks: list) -> bool:
        """Ask the policy before the next word (the source not done). An observing policy
        that answers LOOK gets the candidate (the engine's next token and its
        probability, computed for the word anyway), recorded in ``looks``."""
        def look() -> Candidate:
            if self.engine.probs is None:
                raise ValueError(f"policy: {self.policy!r} answered LOOK; an observing "
                                 "policy says so with a class attribute observes = True")
            token = self.engine.peek(True)
            candidate = Candidate((token,), (self.engine.peek_prob(),))
            looks.append(Look(self.read, candidate.token_ids, candidate.probs,
                              time.monotonic()))
            return candidate

        # The header goes in before the first look: where it does not fit, no look, and
        # the write below ends the run at the context limit.
        header_in = bool(self.engine.fed)
        can_look = header_in or self._fits(len(self.template.header_ids) - 1)
        reads = decide(self.policy, self.read, self.written, False, self.source.length,
                       look if can_look else None) is READ
        if reads and not header_in and self.engine.fed:
            # A look fed the header, and the policy reads: the look leaves nothing behind
            # (the header goes in again under the budget of the first write).
            self.engine.take_back_header()
        return reads

    def _forecast(self, word_length: int, content: bool, reads_after_word: bool,
                  room: bool) -> Forecast:
        """What this loop will do with the next token, whatever it is (an engine that
        pipelines feeds it ahead by this; see :class:`~simulref.engine.Forecast`)."""
        limit = self._words_limit()
        last_word = limit is not None and self.written + 1 >= limit  # if this one is written
        if last_word:
            word_end = FINISH
        elif not self.source_done and reads_after_word:
            word_end = READ_FIRST
        else:
            word_end = FEED
        return Forecast(content=content, cut=word_length >= self.max_tokens_per_word,
                        source_done=self.source_done,
                        # A dropped EOS writes the word (if it has text) before the read:
                        # the words limit may end the run there.
                        eos_reads=not (self.source_done or self.stop_at_first_eos
                                       or (content and last_word)),
                        word_end=word_end, room=room, table=self.table, eos=self.eos)

    def _write(self, word: list[int]) -> Write:
        event = Write(self.written, self.table.text(word), tuple(word), time.monotonic())
        self.written += 1
        return event

    def _words_limit(self) -> int | None:
        if self.max_new_words is not None:
            return self.max_new_words
        if self.source_done:
            return guard_words(self.read)  # a runaway guard; see docs/decoder.md
        return None

    def events(self) -> Iterator:
        # The prefix first: it is computed while a streamed source is still silent.
        self.engine.start(self.template.prefix_ids)
        force_read = False
        looked_read = False  # a read decided on a look, waiting for its word
        while True:
            limit = self._words_limit()
            if limit is not None and self.written >= limit:
                yield Finish("max_new_words", time.monotonic())
                return
            # Nothing is written before the first word is read: there is nothing to
            # translate yet (and an EOS could not be attributed to a word).
            looks: list = []
            reads = not self.source_done and (force_read or self.read == 0
                                              or self._too_far_ahead(self.written)
                                              or (self._look_stands() if looked_read
                                                  else self._policy_reads(looks)))
            looked_read = looked_read and reads
            yield from looks
            if reads:
                event = self._read()
                if event is NEED_INPUT:
                    # The caller pushes a word, and the policy is asked again: the word
                    # pushed can change what the source says (a long-form sentence
                    # closes when the next one starts). A read decided on a look stands
                    # unless the policy now answers without looking (_look_stands), so
                    # no look is recorded twice.
                    looked_read = looked_read or bool(looks)
                    yield event
                    continue
                if event is CONTEXT_LIMIT:
                    yield Finish(CONTEXT_LIMIT, time.monotonic())
                    return
                force_read = looked_read = False
                if event is not None:
                    yield event
                elif self.read == 0:
                    yield Finish(EMPTY_SOURCE, time.monotonic())
                    return
                continue
            # Write one word.
            word: list[int] = []
            content = False
            if not self.engine.fed and not self._fits(len(self.template.header_ids) - 1):
                yield Finish(CONTEXT_LIMIT, time.monotonic())
                return
            while True:
                token = self.engine.peek(not self.source_done)
                while token is PENDING:  # a batched row: the batch runs its forward first
                    yield PENDING
                    token = self.engine.peek(not self.source_done)
                if token in self.eos:
                    if self.source_done or self.stop_at_first_eos:
                        if content:
                            yield self._write(word)
                        yield Finish("eos" if self.source_done else "early_eos",
                                     time.monotonic())
                        return
                    if content:
                        yield self._write(word)
                    yield DroppedEos(self.read - 1, time.monotonic())
                    force_read = True
                    break
                if content and self.table.opens_word(token):
                    yield self._write(word)  # `token` opens the next word
                    break
                if len(word) >= self.max_tokens_per_word:
                    if content:
                        yield self._write(word)
                    if self.source_done:
                        yield Finish("max_tokens_per_word", time.monotonic())
                        return
                    if not content:
                        # Only whitespace so far: waiting for text might never end, so
                        # record the run and read on, as after a dropped EOS.
                        yield BlankRun(self.read - 1, tuple(word), time.monotonic())
                        force_read = True
                    break
                content = content or self.table.has_content(token)
                word.append(token)
                if not self._fits(0):  # no room to feed it: the word ends here, and the run
                    if content:
                        yield self._write(word)
                    yield Finish(CONTEXT_LIMIT, time.monotonic())
                    return
                # Feeding the sampled token before looking at it (mx.async_eval
                # pipelining, as mlx_lm.generate does) pays off unless it ends up dropped,
                # which happens when the next word needs a read first: the policy says in
                # advance (the engines that take a forecast decide token by token).
                reads, room = self._reads_after_word(), self._fits(1)
                self.engine.accept(token, not reads and room, not self.source_done,
                                   forecast=self._forecast(len(word), content, reads, room))
