"""``simulref translate``: translate TEXT (or stdin) and print the target words as they
are written."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator

from simulref.cli.args import (
    EXIT_INTERRUPTED,
    add_longform_options,
    add_model_options,
    check_context,
    check_engine,
    decode_config,
    load_model,
    rebase_times,
    trace_settings,
)
from simulref.cli.sources import _source_name, source_words


def add_translate(subparsers) -> None:
    p = subparsers.add_parser(
        "translate", help="translate a sentence simultaneously and print the result",
        description="Translate TEXT with a wait-k policy, printing target words as they "
                    "are written. TEXT '-' (or none) reads words from stdin as they arrive.")
    p.add_argument("text", nargs="?", metavar="TEXT", help="source sentence, or - for stdin")
    add_model_options(p)
    output = p.add_mutually_exclusive_group()
    output.add_argument("--trace", action="store_true",
                        help="also print the compact read/write trace")
    output.add_argument("--json", action="store_true",
                        help="print the trace as JSON Lines instead of the translation (with "
                             "--longform: each sentence's trace as soon as it is finished)")
    add_longform_options(p)
    p.set_defaults(run=run_translate)


def stream_events(args, source: Iterable[str], model, tokenizer):
    from simulref import decoder

    return decoder.stream(model, tokenizer, source, decode_config(args))


def collect(events: Iterator, on_event: Callable | None = None) -> tuple[list, bool]:
    """Drain an event stream; Ctrl-C closes it and adds Finish("cancelled").
    Returns (events, interrupted)."""
    from simulref.trace import Finish

    out: list = []
    try:
        for event in events:
            out.append(event)
            if on_event:
                on_event(event)
    except KeyboardInterrupt:
        close = getattr(events, "close", None)
        if close:
            close()
        out.append(Finish("cancelled", time.monotonic()))
        if on_event:
            on_event(out[-1])
        return out, True
    return out, False


def run_translate(args) -> int:
    from simulref.trace import Finish, Read, Trace, Write, render_compact

    source = source_words(args.text)
    check_engine(decode_config(args), known_source=isinstance(source, list))
    if args.longform:
        from simulref.cli import longform

        longform.check_options(args)
    model, tokenizer = load_model(args.model, args.dtype, args.adapter)
    if args.longform:  # an endless stream, sentence by sentence (simulref.cli.longform)
        from simulref.cli import longform

        return longform.run_translate(args, source, model, tokenizer, collect)
    check_context(model, tokenizer, source, args, what=_source_name(args.text))
    out = sys.stdout
    written = [0]

    def show(event) -> None:
        if args.json:
            return
        if isinstance(event, Write):
            out.write((" " if written[0] else "") + event.word)
            out.flush()
            written[0] += 1
        elif isinstance(event, Finish):
            out.write("\n")
            out.flush()

    start = time.monotonic()
    events, interrupted = collect(stream_events(args, source, model, tokenizer), show)
    words = tuple(e.word for e in events if isinstance(e, Read))
    trace = rebase_times(Trace(trace_settings(args, source, model), words, tuple(events)), start)
    if args.json:
        out.write(trace.to_jsonl())
    elif args.trace:
        out.write(render_compact(trace) + "\n")
    out.flush()
    return EXIT_INTERRUPTED if interrupted else 0
