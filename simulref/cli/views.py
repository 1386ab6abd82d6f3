"""Terminal views (rich) of a read/write event stream, for ``simulref watch``.

(The plots that evaluation writes are the library's: :mod:`simulref.plots`.)

Every view is a function of (events so far, source words known so far) that returns a
rich renderable, so the same function draws each frame of a live display and the final
picture, and tests can render it to a fixed-width console and compare text.

``source_words`` may run ahead of the events: words that arrived on stdin but that the
policy has not read yet are shown dimmed. So is LocalAgreement's uncommitted tail: the
words of its last hypothesis that are not committed yet (Whisper-Streaming shows its
unconfirmed text the same way), when the view is given ``detokenize`` to spell them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from simulref.trace import (
    BlankRun,
    DroppedEos,
    Event,
    Finish,
    Hypothesis,
    Read,
    SourceEnd,
    Write,
)

CURSOR = "▌"
READ_STYLE = "bold cyan"
PENDING_STYLE = "dim"
TAIL_STYLE = "dim green"  # hypothesised, not committed
WRITE_STYLE = "bold green"


@dataclass(frozen=True)
class Step:
    """A maximal run of reads followed by the writes (and dropped EOS, blank runs) that
    came next."""

    reads: tuple[Read, ...]
    writes: tuple[Write, ...]
    dropped_eos: int = 0
    blank_runs: int = 0


def _reads(events: Sequence[Event]) -> list[Read]:
    return [e for e in events if isinstance(e, Read)]


def _writes(events: Sequence[Event]) -> list[Write]:
    return [e for e in events if isinstance(e, Write)]


def _finish(events: Sequence[Event]) -> Finish | None:
    return next((e for e in reversed(events) if isinstance(e, Finish)), None)


def steps(events: Sequence[Event]) -> list[Step]:
    """Group events into steps: a new step starts at a read that follows a write."""
    out: list[Step] = []
    reads: list[Read] = []
    writes: list[Write] = []
    dropped = blank = 0
    for event in events:
        if isinstance(event, Read):
            if writes or dropped or blank:
                out.append(Step(tuple(reads), tuple(writes), dropped, blank))
                reads, writes, dropped, blank = [], [], 0, 0
            reads.append(event)
        elif isinstance(event, Write):
            writes.append(event)
        elif isinstance(event, DroppedEos):
            dropped += 1
        elif isinstance(event, BlankRun):
            blank += 1
    if reads or writes or dropped or blank:
        out.append(Step(tuple(reads), tuple(writes), dropped, blank))
    return out


def _source_words(events: Sequence[Event], source_words: Sequence[str]) -> list[str]:
    # The events are the authority on what was read; source_words may add pending words.
    words = list(source_words)
    for read in _reads(events):
        if read.source_index < len(words):
            words[read.source_index] = read.word
        else:
            words.extend([""] * (read.source_index - len(words)) + [read.word])
    return words


def uncommitted_tail(events: Sequence[Event]) -> tuple[int, ...]:
    """The token ids of the last hypothesis past what has been written since: what
    LocalAgreement still holds back (empty for every other policy, and once the run
    finished, since the final hypothesis is committed whole)."""
    if _finish(events) is not None:
        return ()
    hypothesis = next((e for e in reversed(events) if isinstance(e, Hypothesis)), None)
    if hypothesis is None:
        return ()
    written = sum(len(w.token_ids) for w in _writes(events))
    return hypothesis.token_ids[written:]


def status_line(events: Sequence[Event], source_words: Sequence[str]) -> Text:
    """``read 4/? · written 3 · lag 1 · running`` while running (the number of source
    words is unknown until the stream ends), ``read 6/6 · written 5 · finish: eos`` after."""
    n_read = len(_reads(events))
    n_written = len(_writes(events))
    finish = _finish(events)
    total = str(len(_source_words(events, source_words))) if finish else "?"
    parts = [f"read {n_read}/{total}", f"written {n_written}"]
    if not finish:  # words read but not yet answered; meaningless once the source is done
        parts.append(f"lag {n_read - n_written}")
    dropped = sum(isinstance(e, DroppedEos) for e in events)
    if dropped:
        parts.append(f"early EOS dropped ×{dropped}")
    blank = sum(isinstance(e, BlankRun) for e in events)
    if blank:
        parts.append(f"blank runs ×{blank}")
    parts.append(f"finish: {finish.reason}" if finish else "running")
    return Text(" · ".join(parts), style="italic")


def live_view(events: Sequence[Event], source_words: Sequence[str] = (), *,
              detokenize: Callable[[Sequence[int]], str] | None = None) -> RenderableType:
    """Two growing lines, source and target, with the read and write cursors.

    Read source words are bold, words that arrived but are not read yet are dim; the
    cursor sits after the last word read (source) and the last word written (target)
    until the stream finishes. With ``detokenize`` (token ids to text: the tokenizer's
    decode), the uncommitted tail of a LocalAgreement hypothesis follows the cursor,
    dimmed."""
    words = _source_words(events, source_words)
    n_read = len(_reads(events))
    running = _finish(events) is None

    source = Text()
    for i, word in enumerate(words):
        if i:
            source.append(" ")
        if i == n_read and running:
            source.append(CURSOR, style="blink")
        source.append(word, style=READ_STYLE if i < n_read else PENDING_STYLE)
    if n_read >= len(words) and running:
        source.append(CURSOR, style="blink")

    # Written pieces carry their own leading whitespace; newlines would break the line.
    written = re.sub(r"\s+", " ", "".join(w.text for w in _writes(events))).strip()
    target = Text()
    target.append(written, style=WRITE_STYLE)
    if running:
        target.append(CURSOR, style="blink")
    tail = uncommitted_tail(events) if detokenize is not None else ()
    if tail:
        target.append(re.sub(r"\s+", " ", detokenize(tail)).rstrip(), style=TAIL_STYLE)

    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(ratio=1)
    grid.add_row("source", source)
    grid.add_row("target", target)
    return Group(grid, status_line(events, source_words))


def side_by_side_view(
    events: Sequence[Event], source_words: Sequence[str] = ()
) -> RenderableType:
    """Source and target columns, one row per step: the words read in that step on the
    left, the words written right after them on the right."""
    table = Table(box=box.SIMPLE_HEAD, expand=False, pad_edge=False)
    table.add_column("step", justify="right", style="dim")
    table.add_column("read", style=READ_STYLE)
    table.add_column("written", style=WRITE_STYLE)
    for number, step in enumerate(steps(events), start=1):
        written = Text(" ".join(w.word for w in step.writes), style=WRITE_STYLE)
        if step.dropped_eos:
            written.append((" " if written else "") + "⟂EOS" * step.dropped_eos, style="dim")
        if step.blank_runs:
            written.append((" " if written else "") + "⟂blank" * step.blank_runs, style="dim")
        table.add_row(str(number), " ".join(r.word for r in step.reads), written)
    words = _source_words(events, source_words)
    pending = words[len(_reads(events)) :]
    if pending:
        table.add_row("…", Text(" ".join(pending), style=PENDING_STYLE), "")
    return Group(table, status_line(events, source_words))


def trace_view(
    events: Sequence[Event], source_words: Sequence[str] = (), *, t0: float | None = None
) -> RenderableType:
    """One row per event with its time in seconds since ``t0`` (default: first event)."""
    table = Table(box=box.SIMPLE_HEAD, expand=False, pad_edge=False)
    table.add_column("t (s)", justify="right")
    table.add_column("event")
    table.add_column("#", justify="right")
    table.add_column("text")
    table.add_column("tokens", justify="right", style="dim")
    if t0 is None and events:
        t0 = events[0].t
    for event in events:
        t = f"{event.t - (t0 or 0.0):.3f}"
        if isinstance(event, Read):
            row = ("read", str(event.source_index), Text(event.word, style=READ_STYLE),
                   str(len(event.token_ids)))
        elif isinstance(event, Write):
            row = ("write", str(event.target_index), Text(event.word, style=WRITE_STYLE),
                   str(len(event.token_ids)))
        elif isinstance(event, DroppedEos):
            row = ("drop-eos", str(event.source_index), Text("early EOS dropped", style="dim"),
                   "")
        elif isinstance(event, BlankRun):
            row = ("blank", str(event.source_index), Text("whitespace only", style="dim"),
                   str(len(event.token_ids)))
        elif isinstance(event, SourceEnd):
            row = ("end", str(event.source_index), Text("end of source", style="dim"),
                   str(len(event.token_ids)))
        else:
            row = ("finish", "", Text(event.reason, style="italic"), "")
        table.add_row(t, *row)
    pending = _source_words(events, source_words)[len(_reads(events)) :]
    if pending:
        label = "unread" if _finish(events) else "waiting"
        table.add_row("", label, "", Text(" ".join(pending), style=PENDING_STYLE), "")
    return Group(table, status_line(events, source_words))


View = Callable[[Sequence[Event], Sequence[str]], RenderableType]
VIEWS: dict[str, View] = {
    "live": live_view,
    "side-by-side": side_by_side_view,
    "trace": trace_view,
}
