"""Read/write policies: pure functions of (words read, words written, source done), and
policies that also look at the model's candidate for the next word.

A policy answers one question before each target word: read another source word, or
write? ``decide(read, written, source_done, source_length)`` is called by the decoder with

- ``read``: source words fed so far,
- ``written``: target words written so far (the next word to write has index ``written``),
- ``source_done``: the source is known to be complete (every word read, or the input ended),
- ``source_length``: N when the source length is known up front, else ``None``.

Once ``source_done`` is true every policy answers WRITE ("after the source ends, write to
the end"); a policy never asks to read past the end.

Convention (the metrics use the same): the source has |X| = N words; the delay of target
word i is the number of source words read when it was written. Wait-k gives
``delay(i) = min(k + i, N)`` for i = 0, 1, ...; the end-of-turn suffix is read together with
the last word, so it adds no delay of its own.

Observing policies (docs/policies.md). A policy may answer :data:`LOOK` instead: "show me
what the model would write next". The decoder then calls ``decide`` again with
``candidate=``, a :class:`Candidate`: the next word's first token under the current budget
(the source read so far) and its probability. The engine has computed that token anyway
(it is the token the word would start with), so a look costs no forward of its own; only
the probability (a softmax over the logits already there) is extra. Count-only policies
never answer LOOK and never get a candidate, so their traces do not change.
:func:`decide` is the one place that asks a policy (the loop and :func:`schedule` use it).

:class:`LocalAgreement` is not asked word by word: it re-translates after each chunk of
source and commits what the last hypotheses agree on (:mod:`simulref.agreement` runs it).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from simulref.checks import check_int, is_int


class Action(enum.Enum):
    READ = "read"
    WRITE = "write"
    LOOK = "look"  # an observing policy asks for the candidate before it answers


READ = Action.READ
WRITE = Action.WRITE
LOOK = Action.LOOK


@dataclass(frozen=True)
class Candidate:
    """What the model would write next, under the current budget: ``token_ids`` (the
    next word's tokens as far as the engine has computed them: its first token) and
    ``probs`` (each token's probability, softmax of the logits it was sampled from).

    The first token alone is what every engine has for free: the rest of the word would
    take one forward per token, which a read would throw away."""

    token_ids: tuple[int, ...]
    probs: tuple[float, ...]

    def __post_init__(self):
        ids, probs = tuple(self.token_ids), tuple(self.probs)
        if not ids or len(ids) != len(probs):
            raise ValueError(f"token_ids, probs: expected as many probabilities as token "
                             f"ids (at least one), got {ids!r} and {probs!r}")
        for i, t in enumerate(ids):
            if not is_int(t) or t < 0:
                raise ValueError(f"token_ids[{i}]: expected an int >= 0, got {t!r}")
        for i, p in enumerate(probs):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f"probs[{i}]: expected a probability in [0, 1], got {p!r}")
        object.__setattr__(self, "token_ids", ids)
        object.__setattr__(self, "probs", tuple(float(p) for p in probs))

    @property
    def first_prob(self) -> float:
        return self.probs[0]


def decide(policy, read: int, written: int, source_done: bool,
           source_length: int | None, look=None) -> Action:
    """The policy's answer in the loop's state: READ or WRITE. When it answers LOOK,
    ``look()`` gives the :class:`Candidate` (the decoder computes it then) and the policy
    is asked again with it; without ``look`` the answer stays LOOK (a forecast that cannot
    know the candidate yet)."""
    action = policy.decide(read, written, source_done, source_length)
    if action is LOOK and look is not None:
        action = policy.decide(read, written, source_done, source_length, candidate=look())
        if action is LOOK:
            raise ValueError(f"policy: {policy!r} answered LOOK although it was given "
                             f"the candidate")
    if not isinstance(action, Action):
        raise TypeError(f"policy: {policy!r}.decide() must return READ, WRITE or LOOK, "
                        f"got {action!r}")
    return action


def _check_count(name: str, value) -> int:
    return check_int(name, value, minimum=0)


def _check_state(read, written, source_done, source_length) -> None:
    _check_count("read", read)
    _check_count("written", written)
    if not isinstance(source_done, bool):
        raise TypeError(f"source_done: expected a bool, got {source_done!r}")
    if source_length is not None:
        _check_count("source_length", source_length)
        if read > source_length:
            raise ValueError(f"read: expected at most source_length={source_length}, "
                             f"got {read}")


def _decide_by_need(need: int, read: int, source_done: bool) -> Action:
    # The source being done is what stops reading, not reaching a count: a streamed source
    # has no known length, and a missing word must never be taken as the end.
    if source_done or read >= need:
        return WRITE
    return READ


@dataclass(frozen=True)
class WaitK:
    """Wait-k (Ma et al., 2019) over words: read k words, then alternate write/read.

    Before target word i (0-based), ``min(k + i, N)`` source words have been read.
    """

    k: int

    def __post_init__(self):
        check_int("k", self.k, minimum=1)

    @property
    def name(self) -> str:
        return f"wait-{self.k}"

    def decide(self, read: int, written: int, source_done: bool,
               source_length: int | None = None) -> Action:
        _check_state(read, written, source_done, source_length)
        return _decide_by_need(self.k + written, read, source_done)


@dataclass(frozen=True)
class ReadAll:
    """Offline translation: read the whole source, then write everything."""

    @property
    def name(self) -> str:
        return "read-all"

    def decide(self, read: int, written: int, source_done: bool,
               source_length: int | None = None) -> Action:
        _check_state(read, written, source_done, source_length)
        return WRITE if source_done else READ


@dataclass(frozen=True)
class Scripted:
    """A fixed schedule, for tests: before target word i, ``delays[i]`` words are read
    (capped at N). Past the end of the script it reads the rest of the source.

    ``delays`` must be non-decreasing ints >= 1 (a target word before any source word
    has nothing to translate)."""

    delays: tuple[int, ...]

    def __post_init__(self):
        if isinstance(self.delays, (str, bytes)) or not isinstance(self.delays, Sequence):
            raise TypeError(f"delays: expected a sequence of ints, got {self.delays!r}")
        delays = tuple(self.delays)
        for i, d in enumerate(delays):
            if not is_int(d) or d < 1:
                raise ValueError(f"delays[{i}]: expected an int >= 1, got {d!r}")
            if i and d < delays[i - 1]:
                raise ValueError(f"delays: expected a non-decreasing sequence, got {delays!r}")
        object.__setattr__(self, "delays", delays)

    @property
    def name(self) -> str:
        return "scripted"

    def decide(self, read: int, written: int, source_done: bool,
               source_length: int | None = None) -> Action:
        _check_state(read, written, source_done, source_length)
        if written >= len(self.delays):
            return WRITE if source_done else READ
        return _decide_by_need(self.delays[written], read, source_done)


def schedule(policy, source_length: int, target_length: int,
             candidates=None) -> tuple[int, ...]:
    """The delays ``policy`` gives ``target_length`` target words over a source of
    ``source_length`` words known up front: words read before each target word.
    ``candidates(read, written)`` gives an observing policy its :class:`Candidate` (a
    model stand-in; without it such a policy raises).

    A slow, obviously-correct simulation of the decoder's read/write loop (no model), for
    tests and for checking a trace's schedule.
    """
    _check_count("source_length", source_length)
    _check_count("target_length", target_length)
    read, delays = 0, []
    while len(delays) < target_length:
        done = read == source_length
        written = len(delays)
        look = (None if candidates is None
                else (lambda read=read, written=written: candidates(read, written)))
        action = decide(policy, read, len(delays), done, source_length, look)
        if action is LOOK:
            raise ValueError(f"candidates: {policy!r} looks at the model; pass candidates=")
        if action is READ:
            if done:
                raise ValueError(f"policy: {policy!r} asked to read past the end")
            read += 1
        else:
            delays.append(read)
    return tuple(delays)


def _check_probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Confidence:
    """Write the next word when the model is sure enough of it: its first token's
    probability (under the source read so far) is at least ``threshold``; otherwise read.
    Never writes before ``k_min`` words are read; once the source ends, always writes.

    Why the first token: it is the one statistic every engine has without a forward (the
    token after the last one fed is computed anyway); a whole word's lowest probability
    would need the word generated before deciding, one forward per token a read throws
    away. threshold 0 writes as soon as ``k_min`` words are read (wait-``k_min`` after the
    first word, then write-write-...); threshold 1 reads (nearly) everything first."""

    threshold: float
    k_min: int = 1
    observes = True  # (a class attribute) the decoder keeps each token's probability

    def __post_init__(self):
        object.__setattr__(self, "threshold", _check_probability("threshold", self.threshold))
        check_int("k_min", self.k_min, minimum=1)

    @property
    def name(self) -> str:
        return f"confidence:{self.threshold!r}" + (f":k_min={self.k_min}"
                                                     if self.k_min != 1 else "")

    def decide(self, read: int, written: int, source_done: bool,
               source_length: int | None = None, candidate: Candidate | None = None
               ) -> Action:
        _check_state(read, written, source_done, source_length)
        if source_done:
            return WRITE
        if read < self.k_min:
            return READ  # no look needed (and none is paid for) below the minimum lag
        if candidate is None:
            return LOOK
        if not isinstance(candidate, Candidate):
            raise TypeError(f"candidate: expected a Candidate, got {candidate!r}")
        return WRITE if candidate.first_prob >= self.threshold else READ

    def confident(self, prob: float) -> bool:
        """The rule :mod:`simulref.verify` checks a recorded look against."""
        return prob >= self.threshold


@dataclass(frozen=True)
class LocalAgreement:
    """LocalAgreement-n (Polak et al., 2022): after each ``chunk`` source words, translate
    again from the committed target to EOS; commit the longest common word prefix of the
    last ``n`` hypotheses; when the source ends, commit the final hypothesis.

    Not a word-by-word policy: :mod:`simulref.agreement` runs it (one KV cache, group
    positions, the previous tail verified as a draft in one forward). ``decide`` answers
    only the reading side (read until a chunk is complete), for callers that simulate
    schedules; the commits come from the model."""

    n: int = 2
    chunk: int = 1

    def __post_init__(self):
        check_int("n", self.n, minimum=1)
        check_int("chunk", self.chunk, minimum=1)

    @property
    def name(self) -> str:
        return f"local-agreement:{self.n}" + (f":chunk={self.chunk}" if self.chunk != 1
                                              else "")

    def update_due(self, read: int, source_done: bool) -> bool:
        """Whether a hypothesis is made now: a whole chunk was read, or the source ended."""
        return source_done or (read > 0 and read % self.chunk == 0)

    def decide(self, read: int, written: int, source_done: bool,
               source_length: int | None = None) -> Action:
        _check_state(read, written, source_done, source_length)
        return WRITE if self.update_due(read, source_done) else READ


def is_agreement(policy) -> bool:
    return isinstance(policy, LocalAgreement)


# ---------------------------------------------------------------- policy syntax

POLICY_SYNTAX = ("wait-k:K | wait-K | read-all | confidence:T[:k_min=K] | "
                 "local-agreement:N[:chunk=C]")


def parse_policy(text: str):
    """A policy from its text form (the command line's ``--policy``, and the ``policy``
    name a trace records): ``wait-k:3`` (or ``wait-3``, WaitK's name), ``read-all``,
    ``confidence:0.6``, ``confidence:0.6:k_min=2``, ``local-agreement:2``,
    ``local-agreement:2:chunk=3``. ``parse_policy(p.name) == p`` for every policy here
    but Scripted. ValueError naming the syntax otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"policy: expected a str ({POLICY_SYNTAX}), got {text!r}")
    head, *rest = text.strip().split(":")
    options, args = {}, []
    for part in rest:
        name, sep, value = part.partition("=")
        if sep:
            if name in options:
                raise ValueError(f"policy: option {name!r} given twice in {text!r}")
            options[name] = value
        elif options:
            raise ValueError(f"policy: a positional value after name=value in {text!r}")
        else:
            args.append(part)

    def fail(why: str):
        return ValueError(f"policy: {why} in {text!r}; expected {POLICY_SYNTAX}")

    def take(allowed: tuple[str, ...], positional: int):
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise fail(f"unknown option(s) {', '.join(unknown)}")
        if len(args) != positional:
            raise fail(f"expected {positional} value(s) after {head!r}, got {len(args)}")

    def integer(value: str, what: str) -> int:
        from simulref.checks import parse_int

        try:
            return parse_int(value, minimum=1)
        except ValueError as error:
            raise fail(f"{what}: {error}") from None

    if head.startswith("wait-") and head != "wait-k":
        take((), 0)
        return WaitK(integer(head[len("wait-"):], "k"))
    if head == "wait-k":
        take((), 1)
        return WaitK(integer(args[0], "k"))
    if head == "read-all":
        take((), 0)
        return ReadAll()
    if head == "confidence":
        take(("k_min",), 1)
        try:
            threshold = float(args[0])
        except ValueError:
            raise fail(f"threshold: expected a number in [0, 1], got {args[0]!r}") from None
        if not 0.0 <= threshold <= 1.0:  # (also refuses nan)
            raise fail(f"threshold: expected a number in [0, 1], got {args[0]!r}")
        k_min = integer(options["k_min"], "k_min") if "k_min" in options else 1
        return Confidence(threshold, k_min)
    if head == "local-agreement":
        take(("chunk",), 1)
        chunk = integer(options["chunk"], "chunk") if "chunk" in options else 1
        return LocalAgreement(integer(args[0], "n"), chunk)
    raise fail(f"unknown policy {head!r}")
