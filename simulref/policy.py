"""Read/write policies: pure functions of (words read, words written, source done).

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
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from simulref.checks import check_int, is_int


class Action(enum.Enum):
    READ = "read"
    WRITE = "write"


READ = Action.READ
WRITE = Action.WRITE


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


def schedule(policy, source_length: int, target_length: int) -> tuple[int, ...]:
    """The delays ``policy`` gives ``target_length`` target words over a source of
    ``source_length`` words known up front: words read before each target word.

    A slow, obviously-correct simulation of the decoder's read/write loop (no model), for
    tests and for checking a trace's schedule.
    """
    _check_count("source_length", source_length)
    _check_count("target_length", target_length)
    read, delays = 0, []
    while len(delays) < target_length:
        done = read == source_length
        if policy.decide(read, len(delays), done, source_length) is READ:
            if done:
                raise ValueError(f"policy: {policy!r} asked to read past the end")
            read += 1
        else:
            delays.append(read)
    return tuple(delays)
