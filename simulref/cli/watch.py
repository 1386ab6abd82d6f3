"""``simulref watch``: a terminal view of source words arriving and target words
appearing (live, side by side, or one row per event)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator

from simulref.cli.args import (
    EXIT_INTERRUPTED,
    UsageError,
    add_longform_options,
    add_model_options,
    check_context,
    check_engine,
    decode_config,
    load_model,
    non_negative_float,
    rebase_times,
    trace_settings,
)
from simulref.cli.output import _check_writable, save_trace, stdout_console
from simulref.cli.sources import Arrivals, _source_name, paced, source_words
from simulref.cli.translate import collect, stream_events

WATCH_MODES = ("live", "side-by-side", "trace")


def add_watch(subparsers) -> None:
    p = subparsers.add_parser(
        "watch", help="watch source words arrive and target words appear",
        description="A terminal view of a simultaneous translation. TEXT '-' reads stdin "
                    "word by word as it arrives (e.g. `asr | simulref watch -`); --delay "
                    "replays a fixed TEXT at a given pace.")
    p.add_argument("text", nargs="?", metavar="TEXT", help="source sentence, or - for stdin")
    add_model_options(p)
    p.add_argument("--mode", choices=WATCH_MODES, default="live",
                   help="live: two growing lines; side-by-side: what was read and written "
                        "at each step; trace: one row per event with its time (default: live)")
    p.add_argument("--delay", type=non_negative_float, default=0.0, metavar="SECONDS",
                   help="pause between source words of a fixed TEXT (default: 0)")
    p.add_argument("--save", metavar="FILE.jsonl", default=None,
                   help="also write the trace to FILE.jsonl (with --longform: each "
                        "sentence's trace, appended as soon as it is finished)")
    add_longform_options(p)
    p.set_defaults(run=run_watch)


def watch(events: Iterator, arrivals: Arrivals, view: Callable, console,
          shown: list | None = None) -> tuple[list, bool]:
    """Drain ``events`` while showing ``view(events so far, words arrived)`` live on a
    terminal; elsewhere (a pipe, a file) print only the final frame. ``shown``: the list
    the events go to as they come (the caller keeps them should the display fail)."""
    from rich.live import Live

    shown = [] if shown is None else shown

    def frame():
        return view(list(shown), list(arrivals.words))

    if not console.is_terminal:
        result = collect(events, shown.append)
        console.print(frame())
        return result
    with Live(get_renderable=frame, console=console, refresh_per_second=8,
              redirect_stdout=False, redirect_stderr=False) as live:
        def on_event(event) -> None:
            shown.append(event)
            live.refresh()

        return collect(events, on_event)


def watch_keeping_events(events: Iterator, arrivals: Arrivals, view: Callable, console):
    """:func:`watch`, but a display that fails (stdout closed, ``> /dev/full``) does not
    end the translation: the rest is decoded unseen, so a --save trace is whole.
    Returns (events, interrupted, the OSError stdout gave or None)."""
    shown: list = []
    try:
        events_seen, interrupted = watch(events, arrivals, view, console, shown)
        return events_seen, interrupted, None
    except OSError as error:  # BrokenPipeError included: the reader went away
        from simulref.trace import Finish

        if shown and isinstance(shown[-1], Finish):  # it failed on the final frame
            return shown, False, error
        rest, interrupted = collect(events)
        return shown + rest, interrupted, error


def run_watch(args) -> int:
    from simulref.cli.views import VIEWS, live_view, trace_view
    from simulref.trace import Read, Trace, write_traces

    if args.delay and (args.text is None or args.text == "-"):
        raise UsageError("--delay: only with a fixed TEXT (stdin sets its own pace)")
    if args.save is not None:
        _check_writable(args.save, "--save")
    source = source_words(args.text)
    check_engine(decode_config(args), known_source=False)  # watch replays even TEXT live
    if args.longform:
        from simulref.cli import longform

        longform.check_options(args)
    model, tokenizer = load_model(args.model, args.dtype, args.adapter)
    if args.longform:  # an endless stream, sentence by sentence (simulref.cli.longform)
        from simulref.cli import longform

        return longform.run_watch(args, paced(source, args.delay), model, tokenizer,
                                  collect)
    check_context(model, tokenizer, source, args, what=_source_name(args.text))
    if args.delay:
        source = paced(source, args.delay)
    start = time.monotonic()
    arrivals = Arrivals(source)
    view = VIEWS[args.mode]
    if view is trace_view:
        view = functools.partial(trace_view, t0=start)
    elif view is live_view:  # LocalAgreement's uncommitted tail, spelled and dimmed
        view = functools.partial(live_view, detokenize=lambda ids: tokenizer.decode(list(ids)))
    events, interrupted, output_error = watch_keeping_events(
        stream_events(args, arrivals, model, tokenizer), arrivals, view, stdout_console())
    if args.save is not None:  # first: the trace is kept whatever stdout did
        words = tuple(e.word for e in events if isinstance(e, Read))
        trace = Trace(trace_settings(args, arrivals, model), words, tuple(events))
        save_trace(args.save, rebase_times(trace, start), "--save", write_traces)
    if output_error is not None:
        raise output_error  # main: 141 for a reader gone away, else a write error
    return EXIT_INTERRUPTED if interrupted else 0
