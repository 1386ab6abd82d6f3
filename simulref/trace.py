"""Read/write events and traces (pure data; no MLX).

A :class:`Trace` is what one simultaneous translation did, in order: which source word
was read when, which target word was written when, and why it stopped. It serializes to
JSON Lines (``simulref.trace/4``, see ``docs/trace-format.md`` and
``simulref/schema/trace.schema.json``): one header record, then one record per event,
keys sorted, so that snapshots diff line by line.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .atomic import atomic_write
from .checks import check_int, is_int

SCHEMA_VERSION = "simulref.trace/4"
# Older versions this reader still accepts, with the event records each lacks.
# /3 is /4 without the look and hypothesis records (observing policies); /2 is /3 without
# the source_end record; /1 is /2 without the blank_run record.
OLDER_SCHEMAS = {"simulref.trace/3": frozenset({"look", "hypothesis"}),
                 "simulref.trace/2": frozenset({"look", "hypothesis", "source_end"}),
                 "simulref.trace/1": frozenset({"look", "hypothesis", "blank_run",
                                                "source_end"})}
# A trace without look or hypothesis records is written as /3, which it is: the traces
# of count-only policies (and their snapshots) stay byte for byte what they were.
_PLAIN_SCHEMA = "simulref.trace/3"

FINISH_REASONS = (
    "eos", "max_new_words", "max_tokens_per_word", "early_eos", "cancelled", "empty_source",
    "context_limit",
)


def _check_index(owner: str, name: str, value: object, minimum: int = 0) -> None:
    check_int(f"{owner}.{name}", value, minimum=minimum)


def _check_str(owner: str, name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{owner}.{name} must be a str, got {type(value).__name__}")


def _token_tuple(owner: str, value: object) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{owner}.token_ids must be a sequence of ints, got {value!r}")
    ids = tuple(value)
    for i in ids:
        if not is_int(i) or i < 0:
            raise TypeError(f"{owner}.token_ids must hold ints >= 0, got {i!r}")
    return ids


def _time(owner: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}.t must be a float (seconds), got {type(value).__name__}")
    t = float(value)
    # NaN would make two equal traces compare unequal and is not valid JSON.
    if not math.isfinite(t):
        raise ValueError(f"{owner}.t must be finite, got {value!r}")
    return t


@dataclass(frozen=True)
class Read:
    """Source word ``source_index`` (0-based) was fed to the model.

    ``token_ids`` are the tokens fed for it (the end-of-user-turn suffix included on
    the last word)."""

    source_index: int
    word: str
    token_ids: tuple[int, ...]
    t: float = 0.0

    def __post_init__(self) -> None:
        _check_index("Read", "source_index", self.source_index)
        _check_str("Read", "word", self.word)
        object.__setattr__(self, "token_ids", _token_tuple("Read", self.token_ids))
        object.__setattr__(self, "t", _time("Read", self.t))


@dataclass(frozen=True)
class Write:
    """Target word ``target_index`` (0-based) was written; ``text`` is its decoded
    piece including any leading whitespace."""

    target_index: int
    text: str
    token_ids: tuple[int, ...]
    t: float = 0.0

    def __post_init__(self) -> None:
        _check_index("Write", "target_index", self.target_index)
        _check_str("Write", "text", self.text)
        object.__setattr__(self, "token_ids", _token_tuple("Write", self.token_ids))
        object.__setattr__(self, "t", _time("Write", self.t))

    @property
    def word(self) -> str:
        return self.text.strip()


@dataclass(frozen=True)
class DroppedEos:
    """The model sampled EOS after ``source_index + 1`` words were read, before the
    source ended; the decoder dropped it and read on."""

    source_index: int
    t: float = 0.0

    def __post_init__(self) -> None:
        _check_index("DroppedEos", "source_index", self.source_index)
        object.__setattr__(self, "t", _time("DroppedEos", self.t))


@dataclass(frozen=True)
class BlankRun:
    """After ``source_index + 1`` words were read, before the source ended, the model
    wrote ``settings.max_tokens_per_word`` tokens with no visible text (whitespace
    only). No word is written from them; they stay in the KV cache, and the decoder
    reads on (as after a dropped EOS) instead of waiting for text that may not come."""

    source_index: int
    token_ids: tuple[int, ...]
    t: float = 0.0

    def __post_init__(self) -> None:
        _check_index("BlankRun", "source_index", self.source_index)
        object.__setattr__(self, "token_ids", _token_tuple("BlankRun", self.token_ids))
        object.__setattr__(self, "t", _time("BlankRun", self.t))


@dataclass(frozen=True)
class SourceEnd:
    """A live source ended after ``source_index`` words (all of them read): its end
    became known only then, so the end-of-user-turn suffix, ``token_ids``, went in as a
    chunk of its own. (A source known up front, or a Feed word pushed ``last=True``,
    carries the suffix in its last Read instead.) In a long-form run it ends a sentence's
    user turn (the stream goes on). Not a word: the metrics count Reads."""

    source_index: int
    token_ids: tuple[int, ...]
    t: float = 0.0

    def __post_init__(self) -> None:
        _check_index("SourceEnd", "source_index", self.source_index)
        object.__setattr__(self, "token_ids", _token_tuple("SourceEnd", self.token_ids))
        object.__setattr__(self, "t", _time("SourceEnd", self.t))


def _probs(owner: str, value: object, n: int) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{owner}.probs must be a sequence of floats, got {value!r}")
    probs = tuple(value)
    if len(probs) != n:
        raise ValueError(f"{owner}.probs must hold one probability per token id ({n}), "
                         f"got {len(probs)}")
    for p in probs:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"{owner}.probs must hold probabilities in [0, 1], got {p!r}")
    return tuple(float(p) for p in probs)


@dataclass(frozen=True)
class Look:
    """An observing policy looked at the model's candidate for the next word after
    ``read`` source words: ``token_ids`` (its first token) and their ``probs`` under that
    budget. The next event says what it decided (a read, or the word written)."""

    read: int
    token_ids: tuple[int, ...]
    probs: tuple[float, ...]
    t: float = 0.0

    def __post_init__(self) -> None:
        _check_index("Look", "read", self.read)
        ids = _token_tuple("Look", self.token_ids)
        object.__setattr__(self, "token_ids", ids)
        object.__setattr__(self, "probs", _probs("Look", self.probs, len(ids)))
        object.__setattr__(self, "t", _time("Look", self.t))


@dataclass(frozen=True)
class Hypothesis:
    """LocalAgreement translated again after ``read`` source words: ``token_ids`` is the
    whole hypothesis from the target's start (the committed words first, EOS left out).
    The writes that follow it are the words it committed."""

    read: int
    token_ids: tuple[int, ...]
    t: float = 0.0

    def __post_init__(self) -> None:
        _check_index("Hypothesis", "read", self.read)
        object.__setattr__(self, "token_ids", _token_tuple("Hypothesis", self.token_ids))
        object.__setattr__(self, "t", _time("Hypothesis", self.t))


@dataclass(frozen=True)
class Finish:
    """The translation ended; ``reason`` is one of :data:`FINISH_REASONS`."""

    reason: str
    t: float = 0.0

    def __post_init__(self) -> None:
        _check_str("Finish", "reason", self.reason)
        if self.reason not in FINISH_REASONS:
            raise ValueError(
                f"Finish.reason must be one of {', '.join(FINISH_REASONS)}; got {self.reason!r}"
            )
        object.__setattr__(self, "t", _time("Finish", self.t))


Event = Read | Write | DroppedEos | BlankRun | SourceEnd | Look | Hypothesis | Finish

_EVENT_TYPES = (Read, Write, DroppedEos, BlankRun, SourceEnd, Look, Hypothesis, Finish)

# JSON scalars only: an option must survive the JSON round trip and keep Settings hashable.
_Scalar = str | int | float | bool | None


@dataclass(frozen=True, kw_only=True)
class Settings:
    """How a trace was produced: everything needed to reproduce it, bar the model weights.

    ``extra`` holds further options (sampler, policy name, ...) as JSON scalars; pass a
    mapping, it is stored as a tuple of (name, value) pairs sorted by name so that
    Settings stays hashable and compares by content. Read one with :meth:`option`."""

    model: str
    k: int | None
    layout: str
    system: str
    target_start: int | str = "auto"
    max_tokens_per_word: int | None = 50
    max_new_words: int | None = None
    stop_at_first_eos: bool = False
    extra: tuple[tuple[str, _Scalar], ...] = field(default=())

    def __post_init__(self) -> None:
        _check_str("Settings", "model", self.model)
        _check_str("Settings", "layout", self.layout)
        _check_str("Settings", "system", self.system)
        if not self.layout:
            raise ValueError("Settings.layout must be a non-empty str")
        if self.k is not None:
            _check_index("Settings", "k", self.k)
        if self.target_start != "auto":
            if isinstance(self.target_start, str):
                raise ValueError(
                    f"Settings.target_start must be an int >= 0 or 'auto', "
                    f"got {self.target_start!r}"
                )
            _check_index("Settings", "target_start", self.target_start)
        if self.max_tokens_per_word is not None:
            _check_index("Settings", "max_tokens_per_word", self.max_tokens_per_word, 1)
        if self.max_new_words is not None:
            _check_index("Settings", "max_new_words", self.max_new_words)
        if not isinstance(self.stop_at_first_eos, bool):
            raise TypeError("Settings.stop_at_first_eos must be a bool")
        object.__setattr__(self, "extra", _normalize_extra(self.extra))

    def option(self, name: str, default: Any = None) -> Any:
        """The extra option ``name``, or ``default`` when it was not given."""
        return dict(self.extra).get(name, default)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Settings:
        if not isinstance(data, Mapping):
            raise TypeError(f"settings must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown settings key(s) {unknown}; expected some of {sorted(names)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.name in _REQUIRED)
        if missing:
            raise ValueError(f"settings is missing {missing}")
        return cls(**data)


_REQUIRED = ("model", "k", "layout", "system")


def _normalize_extra(extra: object) -> tuple[tuple[str, _Scalar], ...]:
    if isinstance(extra, Mapping):
        items = list(extra.items())
    elif isinstance(extra, (tuple, list)):
        items = []
        for pair in extra:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"Settings.extra must hold (name, value) pairs, got {pair!r}")
            items.append(tuple(pair))
    else:
        raise TypeError(f"Settings.extra must be a mapping of options, got {type(extra).__name__}")
    reserved = {f.name for f in fields(Settings)}
    seen: set[str] = set()
    for name, value in items:
        if not isinstance(name, str) or not name:
            raise TypeError(f"Settings.extra names must be non-empty str, got {name!r}")
        if name in reserved:
            raise ValueError(f"Settings.extra option {name!r} shadows a Settings field")
        if name in seen:
            raise ValueError(f"Settings.extra option {name!r} given twice")
        seen.add(name)
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise TypeError(
                f"Settings.extra[{name!r}] must be a JSON scalar "
                f"(str, int, float, bool, None), got {type(value).__name__}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"Settings.extra[{name!r}] must be finite, got {value!r}")
    return tuple(sorted(items, key=lambda kv: kv[0]))


@dataclass(frozen=True)
class Trace:
    """One translation: its settings, its source words, and its events in order.

    Construction only checks types; whether the events form a valid schedule (indices
    in order, reads matching the source, one final Finish) is ``simulref.verify``'s job,
    so that broken traces can still be built, stored and diagnosed."""

    settings: Settings
    source_words: tuple[str, ...]
    events: tuple[Event, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.settings, Settings):
            raise TypeError(f"Trace.settings must be Settings, got {type(self.settings).__name__}")
        if isinstance(self.source_words, str):
            raise TypeError("Trace.source_words must be a sequence of words, not one str")
        words = tuple(self.source_words)
        for w in words:
            _check_str("Trace", "source_words[...]", w)
        events = tuple(self.events)
        for e in events:
            if not isinstance(e, _EVENT_TYPES):
                raise TypeError(
                    f"Trace.events must hold "
                    f"{'/'.join(t.__name__ for t in _EVENT_TYPES)}, got {type(e).__name__}"
                )
        object.__setattr__(self, "source_words", words)
        object.__setattr__(self, "events", events)

    @property
    def writes(self) -> tuple[Write, ...]:
        return tuple(e for e in self.events if isinstance(e, Write))

    @property
    def reads(self) -> tuple[Read, ...]:
        return tuple(e for e in self.events if isinstance(e, Read))

    @property
    def target_words(self) -> tuple[str, ...]:
        return tuple(w.word for w in self.writes)

    @property
    def target_text(self) -> str:
        return "".join(w.text for w in self.writes).strip()

    @property
    def delays(self) -> tuple[int, ...]:
        """For each Write, the number of Read events before it (source words read)."""
        out: list[int] = []
        read = 0
        for e in self.events:
            if isinstance(e, Read):
                read += 1
            elif isinstance(e, Write):
                out.append(read)
        return tuple(out)

    @property
    def finish_reason(self) -> str | None:
        for e in reversed(self.events):
            if isinstance(e, Finish):
                return e.reason
        return None

    def without_times(self) -> Trace:
        """The same trace with every event time set to 0.0 (what ``times=False`` keeps)."""
        return replace(self, events=tuple(replace(e, t=0.0) for e in self.events))

    def to_jsonl(self, *, times: bool = True) -> str:
        """JSON Lines text: the header record, then one record per event, each ending in
        a newline. ``times=False`` leaves the ``t`` fields out (stable snapshots)."""
        lines = [_dumps(self._header())]
        lines += [_dumps(_event_record(e, times=times)) for e in self.events]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def from_jsonl(cls, text: str) -> Trace:
        """Parse JSON Lines holding exactly one trace."""
        traces = _parse(text)
        if len(traces) != 1:
            raise ValueError(f"expected exactly one trace, found {len(traces)}")
        return traces[0]

    @property
    def schema(self) -> str:
        """The version this trace is written as: the oldest that holds its records."""
        if any(isinstance(e, (Look, Hypothesis)) for e in self.events):
            return SCHEMA_VERSION
        return _PLAIN_SCHEMA

    @property
    def hypotheses(self) -> tuple[Hypothesis, ...]:
        return tuple(e for e in self.events if isinstance(e, Hypothesis))

    def _header(self) -> dict[str, Any]:
        return {
            "record": "trace",
            "schema": self.schema,
            "settings": self.settings.to_dict(),
            "source_words": list(self.source_words),
            # Derived, for readers that don't want to replay the events.
            "target_words": list(self.target_words),
            "delays": list(self.delays),
            "finish_reason": self.finish_reason,
        }


def _dumps(record: Mapping[str, Any]) -> str:
    # float repr round-trips exactly; non-ASCII kept readable (escaping only what JSON must).
    return json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False)


_EVENT_RECORD = {
    Read: "read", Write: "write", DroppedEos: "dropped_eos", BlankRun: "blank_run",
    SourceEnd: "source_end", Look: "look", Hypothesis: "hypothesis", Finish: "finish",
}
# The "record" name of each event class in JSON Lines, and back (verify reads with it).
RECORD_EVENT = {v: k for k, v in _EVENT_RECORD.items()}


def _event_record(e: Event, *, times: bool) -> dict[str, Any]:
    record: dict[str, Any] = {"record": _EVENT_RECORD[type(e)]}
    for f in fields(e):
        if f.name == "t" and not times:
            continue
        value = getattr(e, f.name)
        record[f.name] = list(value) if f.name in ("token_ids", "probs") else value
    return record


# ---------------------------------------------------------------------------- reading

_HEADER_KEYS = {
    "record", "schema", "settings", "source_words", "target_words", "delays", "finish_reason",
}


class _Line:
    """One parsed record with its 1-based line number, for error messages."""

    def __init__(self, number: int, record: dict[str, Any]):
        self.number = number
        self.record = record

    def fail(self, what: str) -> ValueError:
        return ValueError(f"line {self.number}: {what}")


@dataclass(frozen=True)
class HeaderDisagreement:
    """A derived field of a trace header (``target_words``, ``delays`` or
    ``finish_reason``) that says something else than the trace's events: ``header`` is
    what the header claims, ``events`` what the events give; ``line`` the header's 1-based
    line number."""

    key: str
    header: Any
    events: Any
    line: int

    def __str__(self) -> str:
        return (f"line {self.line}: header {self.key} {self.header!r} disagrees with the "
                f"events, which give {self.events!r}")


def _parse(text: str) -> list[Trace]:
    return [trace for trace, _ in _parse_groups(text, lenient=False)]


def _parse_groups(text: str, *, lenient: bool) -> list[tuple[Trace, list[HeaderDisagreement]]]:
    if not isinstance(text, str):
        raise TypeError(f"expected JSON Lines text (str), got {type(text).__name__}")
    groups: list[tuple[_Line, list[_Line]]] = []
    # Split on "\n" only: str.splitlines() would also split inside strings at U+2028, U+0085,
    # which JSON leaves unescaped.
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"line {number}: expected a JSON object, got invalid JSON ({exc})"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(f"line {number}: expected a JSON object, got {type(record).__name__}")
        line = _Line(number, record)
        kind = record.get("record")
        if kind == "trace":
            groups.append((line, []))
        elif kind in RECORD_EVENT:
            if not groups:
                raise line.fail(f"expected a 'trace' header record first, got {kind!r}")
            groups[-1][1].append(line)
        else:
            expected = ", ".join(repr(k) for k in ["trace", *RECORD_EVENT])
            raise line.fail(f"expected 'record' to be one of {expected}, got {kind!r}")
    return [_build(header, events, lenient) for header, events in groups]


def _build(header: _Line, event_lines: list[_Line],
           lenient: bool) -> tuple[Trace, list[HeaderDisagreement]]:
    h = header.record
    missing = sorted(_HEADER_KEYS - set(h))
    if missing:
        raise header.fail(f"trace header is missing {missing}")
    unknown = sorted(set(h) - _HEADER_KEYS)
    if unknown:
        raise header.fail(f"unexpected key(s) {unknown} in trace header")
    if h["schema"] != SCHEMA_VERSION and h["schema"] not in OLDER_SCHEMAS:
        readable = ", ".join(repr(v) for v in (SCHEMA_VERSION, *OLDER_SCHEMAS))
        raise header.fail(f"unsupported schema {h['schema']!r}, expected one of {readable}")
    lacking = OLDER_SCHEMAS.get(h["schema"], frozenset())
    try:
        settings = Settings.from_dict(h["settings"])
        if not isinstance(h["source_words"], list):
            raise TypeError("source_words must be a list of str")
        source_words = Trace(settings, tuple(h["source_words"]), ()).source_words
    except (TypeError, ValueError) as exc:
        raise header.fail(f"bad trace header: {exc}") from None
    events: list[Event] = []
    for line in event_lines:
        if line.record["record"] in lacking:
            raise line.fail(f"{line.record['record']!r} records do not exist in schema "
                            f"{h['schema']!r}")
        try:
            events.append(_event(line.record))
        except (TypeError, ValueError) as exc:
            raise line.fail(f"bad {line.record['record']} record: {exc}") from None
    trace = Trace(settings, source_words, tuple(events))
    derived = {
        "target_words": list(trace.target_words),
        "delays": list(trace.delays),
        "finish_reason": trace.finish_reason,
    }
    disagreements = [HeaderDisagreement(key, h[key], value, header.number)
                     for key, value in derived.items() if h[key] != value]
    if disagreements and not lenient:
        raise ValueError(str(disagreements[0]))
    return trace, disagreements


def _event(record: Mapping[str, Any]) -> Event:
    cls = RECORD_EVENT[record["record"]]
    names = {f.name for f in fields(cls)}
    keys = set(record) - {"record"}
    required = names - {"t"}
    missing = sorted(required - keys)
    if missing:
        raise ValueError(f"missing {missing}")
    unknown = sorted(keys - names)
    if unknown:
        raise ValueError(f"unexpected key(s) {unknown}; expected {sorted(names)}")
    kwargs = {name: record[name] for name in keys}
    if "token_ids" in kwargs and not isinstance(kwargs["token_ids"], list):
        raise TypeError(f"token_ids must be a list of ints, got {kwargs['token_ids']!r}")
    if "probs" in kwargs and not isinstance(kwargs["probs"], list):
        raise TypeError(f"probs must be a list of floats, got {kwargs['probs']!r}")
    return cls(**kwargs)


# ---------------------------------------------------------------------------- files


def read_traces(source: str | os.PathLike[str]) -> list[Trace]:
    """All traces in a JSON Lines file (a path) or in JSON Lines text.

    A ``str`` that is blank, holds a newline or starts with ``{`` is taken as text; any
    other str or path-like as a file name."""
    return _parse(_text_of(source))


def _text_of(source: str | os.PathLike[str]) -> str:
    if isinstance(source, str) and (
        not source.strip() or "\n" in source or source.lstrip().startswith("{")
    ):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"read_traces expects a path or JSON Lines text, got {source!r}")
    return Path(source).read_text(encoding="utf-8")


def read_traces_lenient(
        source: str | os.PathLike[str]) -> list[tuple[Trace, list[HeaderDisagreement]]]:
    """:func:`read_traces`, but a header whose derived fields (``target_words``,
    ``delays``, ``finish_reason``) disagree with its events is no error: each trace comes
    with its :class:`HeaderDisagreement` list (empty when the header is right). Everything
    else is read as strictly (``simulref.verify`` reports the disagreements)."""
    return _parse_groups(_text_of(source), lenient=True)


def write_traces(path: str | os.PathLike[str], traces: Iterable[Trace], *,
                 times: bool = True) -> None:
    """Write traces to ``path`` as JSON Lines, atomically (temp file, then rename)."""
    traces = list(traces)
    for tr in traces:
        if not isinstance(tr, Trace):
            raise TypeError(f"write_traces expects Trace objects, got {type(tr).__name__}")
    text = "".join(tr.to_jsonl(times=times) for tr in traces)
    with atomic_write(path, text=True) as handle:
        handle.write(text)


# ---------------------------------------------------------------------------- rendering


def _token(word: str) -> str:
    # Quote what would otherwise be ambiguous in a space-separated line.
    if not word or any(ch.isspace() for ch in word) or word.startswith('"'):
        return json.dumps(word, ensure_ascii=False)
    return word


def render_compact(trace: Trace) -> str:
    """One line for humans: ``R The  R quick  W Le  E  F:eos``.

    ``R`` read, ``W`` write (its stripped word), ``E`` a dropped EOS, ``B`` a blank run,
    ``R$`` the end of a live source (its suffix read alone), ``L p`` a look (the
    candidate's first probability), ``H n`` a hypothesis of n tokens, ``F:<reason>`` the
    finish.
    Empty words or words with spaces are shown JSON-quoted."""
    parts: list[str] = []
    for e in trace.events:
        if isinstance(e, Read):
            parts.append(f"R {_token(e.word)}")
        elif isinstance(e, Write):
            parts.append(f"W {_token(e.word)}")
        elif isinstance(e, DroppedEos):
            parts.append("E")
        elif isinstance(e, BlankRun):
            parts.append("B")
        elif isinstance(e, SourceEnd):
            parts.append("R$")
        elif isinstance(e, Look):
            parts.append(f"L {e.probs[0]:.2f}")
        elif isinstance(e, Hypothesis):
            parts.append(f"H {len(e.token_ids)}")
        else:
            parts.append(f"F:{e.reason}")
    return "  ".join(parts)
