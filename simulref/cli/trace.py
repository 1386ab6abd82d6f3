"""``simulref trace``: stored traces rendered compactly."""

from __future__ import annotations

from pathlib import Path

from simulref.cli.args import UsageError


def add_trace(subparsers) -> None:
    p = subparsers.add_parser("trace", help="render stored traces compactly",
                              description="Print each trace in FILE.jsonl as two lines: "
                                          "its target text, then its events on one line "
                                          "(R read, W write, E dropped EOS, B blank run, "
                                          "R$ source end, L look, H hypothesis, F "
                                          "finish; docs/trace-format.md).")
    p.add_argument("file", metavar="FILE.jsonl")
    p.set_defaults(run=run_trace)


def run_trace(args) -> int:
    from simulref.trace import read_traces, render_compact

    try:
        traces = read_traces(Path(args.file))
    except OSError as error:
        raise UsageError(f"{args.file}: cannot read ({error.strerror or error})") from None
    except (ValueError, TypeError) as error:
        raise UsageError(f"{args.file}: {error}") from None
    if not traces:
        raise UsageError(f"{args.file}: no trace in the file")
    for trace in traces:
        print(f"{trace.target_text}\n  {render_compact(trace)}")
    return 0
