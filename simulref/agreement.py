"""LocalAgreement-n on one KV cache (docs/policies.md).

After each chunk of source words the model translates again, greedily, from the committed
target to EOS (bounded by the word guard); the words the last ``n`` hypotheses agree on
are committed (Write events), and when the source ends the final hypothesis is.

One cache, group positions, nothing re-encoded:

- committed tokens keep their cache entries; the uncommitted tail is trimmed before the
  next chunk is read (source keys never see target keys, so reading after target tokens
  is the same cache as reading before them);
- the last committed token is fed again after the read, so the first new token sees the
  new source, as the word-by-word loop does; with nothing committed yet, the whole header
  is (its entries are not the target's: they would otherwise stay computed under the
  first hypothesis's budget, one word);
- **fast path** (``engine="auto"``): that re-feed carries the previous hypothesis's
  uncommitted tail as a draft, in one forward; greedy argmax at each draft position says
  how far the model, given the new source, still predicts the old tokens (speculative
  decoding's verification). Those tokens are the new hypothesis's start, their entries
  are already in the cache; generation goes on from the first disagreement;
- **slow twin** (``engine="incremental"``): the same, every token generated one forward
  at a time. Both give the same trace (tests/unit/test_agreement.py).

Word boundaries are the loop's (:class:`~simulref.decoder.TokenTable`): a token that opens
a word ends the word before it once that word has text; a word of
``max_tokens_per_word`` tokens, or EOS, ends the hypothesis.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .cache import TARGET
from .engine import Forward, IncrementalEngine
from .limits import guard_words
from .loop import CONTEXT_LIMIT, EMPTY_SOURCE, NEED_INPUT, _Run
from .trace import Finish, Hypothesis, Read

FAST, TWIN = "draft", "incremental"  # the engine names the trace records


class AgreementEngine(IncrementalEngine):
    """Target tokens fed in chunks, predictions read back as host ints, arbitrary trims:
    what re-translation needs from one group-layout cache."""

    def __init__(self, model, template, *, target_start, on_forward, known_source: bool,
                 fast: bool):
        super().__init__(model, template, layout="group", target_start=target_start,
                         sampler=None, on_forward=on_forward, known_source=known_source)
        self.name = FAST if fast else TWIN

    def read(self, ids: Sequence[int]) -> None:
        self._feed_source(ids)  # the run rewinds the target first (rewind())

    def rewind(self, keep: int) -> int:
        """Keep the first ``keep`` target tokens' entries but the last of them, which is
        returned: it is fed again after the next read."""
        last = self.fed[keep - 1]
        self.trim(len(self.fed) - keep + 1)
        return last

    def trim(self, n: int) -> None:
        if n:
            self._trim(n)
            del self.fed[len(self.fed) - n:]

    def predict(self, ids: Sequence[int]) -> int:
        """Feed ``ids``; the greedy token after the last of them."""
        self.fed.extend(ids)
        return self._feed_targets(list(ids)).item()

    def predict_all(self, ids: Sequence[int]) -> list[int]:
        """Feed ``ids`` in one forward; the greedy token after each of them."""
        import mlx.core as mx

        self._flush_source()
        tokens = mx.array(list(ids), dtype=mx.int32)
        start = self.shared.length
        self.shared.begin(TARGET, len(ids), visible=None)
        if self.split is None:
            logits = self.model(tokens[None], cache=self.caches)[0]
        else:
            body, head = self.split
            logits = head(body(tokens[None], cache=self.caches))[0]
        if self.on_forward is not None:
            self.on_forward(Forward(start, tokens, self.shared.positions(), TARGET,
                                    logits[-1]))
        self.fed.extend(ids)
        return mx.argmax(logits, axis=-1).tolist()


def common_prefix(hypotheses: Sequence[Sequence[tuple[int, ...]]]) -> list[tuple[int, ...]]:
    """The longest common word prefix (words compared as token tuples)."""
    out = []
    for words in zip(*hypotheses, strict=False):  # as far as the shortest
        if any(w != words[0] for w in words):
            break
        out.append(words[0])
    return out


class AgreementRun(_Run):
    """The read / re-translate / commit loop (the policy's ``n`` and ``chunk``)."""

    def __init__(self, *args, fast: bool):
        super().__init__(*args)
        self.fast = fast
        self.committed: list[tuple[int, ...]] = []  # committed words
        self.history: list[list[tuple[int, ...]]] = []  # every hypothesis, as words
        self.tail: list[int] = []  # the last hypothesis's uncommitted tokens

    def _limit(self) -> int:
        if self.max_new_words is not None:
            return self.max_new_words
        return guard_words(self.read)  # the decoder's runaway guard, per hypothesis

    def events(self):
        policy = self.policy
        self.engine.start(self.template.prefix_ids)
        while True:
            rewound = None  # the target token fed again after the read (None: the header)
            trimmed = False
            got = 0
            while not self.source_done and got < policy.chunk:
                if not trimmed and self.engine.fed:
                    trimmed = True
                    if self.committed:
                        rewound = self.engine.rewind(len(self.template.header_ids)
                                                     + sum(map(len, self.committed)))
                    else:  # nothing committed: the header goes in again, under the new
                        self.engine.take_back_header()  # budget (as a look's does)
                event = self._read()
                if event is NEED_INPUT:
                    yield event
                    continue
                if event is CONTEXT_LIMIT:
                    yield Finish(CONTEXT_LIMIT, time.monotonic())
                    return
                if event is None:
                    continue  # the source turned out to be over
                yield event
                if isinstance(event, Read):
                    got += 1
            if self.read == 0:
                yield Finish(EMPTY_SOURCE, time.monotonic())
                return
            words, reason = self._hypothesis(rewound)
            hypothesis = self.committed + words
            self.history.append(hypothesis)
            yield Hypothesis(self.read, tuple(t for w in hypothesis for t in w),
                             time.monotonic())
            final = self.source_done or reason == CONTEXT_LIMIT
            if final:
                agreed = hypothesis
            elif len(self.history) >= policy.n:
                agreed = common_prefix(self.history[-policy.n:])
            else:
                agreed = self.committed
            for word in agreed[len(self.committed):]:
                yield self._write(list(word))
            self.committed = list(agreed)
            self.tail = [t for w in hypothesis[len(agreed):] for t in w]
            limit = self.max_new_words
            if final or (limit is not None and len(self.committed) >= limit):
                yield Finish(reason if final else "max_new_words", time.monotonic())
                return

    def _hypothesis(self, last: int | None) -> tuple[list[tuple[int, ...]], str]:
        """Generate from the committed target to the end (the new words after the
        committed ones, and why it stopped). ``last``: the target token fed again after
        the read (None while nothing is committed: the header goes in)."""
        engine = self.engine
        draft = self.tail if self.fast else []
        first = self._header_ids() if last is None else [last]
        if draft:  # the greedy token after the last of ``first``, then after each draft one
            preds = engine.predict_all([*first, *draft])[len(first) - 1:]
        else:
            preds = [engine.predict(first)]
        accepted = 0  # draft tokens taken (their entries are in the cache)
        words: list[tuple[int, ...]] = []
        word: list[int] = []
        content = False
        predicted = preds[0]
        limit = self._limit()
        reason = "eos"
        while True:
            if len(self.committed) + len(words) >= limit:
                reason = "max_new_words"
                break
            if predicted in self.eos:
                break
            if content and self.table.opens_word(predicted):
                words.append(tuple(word))
                word, content = [], False
                continue  # the limit is checked again before the next word starts
            if len(word) >= self.max_tokens_per_word:
                reason = "max_tokens_per_word"
                break
            if not self._fits(1):
                reason = CONTEXT_LIMIT
                break
            word.append(predicted)
            content = content or self.table.has_content(predicted)
            if accepted < len(draft) and predicted == draft[accepted]:
                accepted += 1
                predicted = preds[accepted]  # computed in the draft forward
                continue
            if accepted < len(draft):  # the first disagreement: the rest goes
                engine.trim(len(draft) - accepted)
                draft = draft[:accepted]
            predicted = engine.predict([predicted])
        if content:
            words.append(tuple(word))
        engine.trim(len(draft) - accepted)  # draft tokens after where it stopped
        return words, reason

    def _header_ids(self) -> list[int]:
        header = list(self.template.header_ids)
        if not header:
            raise ValueError("chat_format: the assistant header tokenizes to nothing")
        return header


def make_agreement_run(config, model, template, source, word_ids, policy, table, eos,
                       on_forward, context) -> AgreementRun:
    if config.layout != "group":
        raise ValueError(f"layout: LocalAgreement runs on one cache in the 'group' layout, "
                         f"got {config.layout!r}")
    if config.engine not in ("auto", "incremental"):
        raise ValueError(f"engine: LocalAgreement runs 'auto' (the draft fast path) or "
                         f"'incremental' (its twin, token by token), got {config.engine!r}")
    if config.sampler is not None:
        from .engine import is_greedy

        if not is_greedy(config.sampler):
            raise ValueError("sampler: LocalAgreement is greedy (the draft check is an "
                             "argmax); leave sampler unset")
    fast = config.engine == "auto"
    engine = AgreementEngine(model, template, target_start=config.target_start,
                             on_forward=on_forward, known_source=source.length is not None,
                             fast=fast)
    return AgreementRun(engine, template, source, word_ids, policy, table, eos,
                        config.max_tokens_per_word, config.max_new_words,
                        config.stop_at_first_eos, context, fast=fast)
