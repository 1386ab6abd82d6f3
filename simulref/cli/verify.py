"""``simulref verify``: check traces against the reference's rules (and, with --against,
against reference traces). Exit code: 0 pass, 1 violations, 2 unreadable input."""

from __future__ import annotations

import argparse
import sys

from simulref.cli.args import EXIT_USAGE, positive_int

EXIT_PASS = 0
EXIT_VIOLATIONS = 1
EXIT_UNREADABLE = EXIT_USAGE


def add_verify_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``simulref verify`` on an argparse ``subparsers`` object; the parsed
    namespace's ``run(args)`` runs it and returns the exit code."""
    p = subparsers.add_parser(
        "verify", help="check traces against the reference's rules (and a reference trace)",
        description="Check each trace in TRACE.jsonl: reads in order and matching the "
                    "source, writes in order and never before wait-k allows, one final "
                    "finish. With --against, also report the first event where each trace "
                    "differs from the trace at the same position in REF.jsonl. Exit code: "
                    "0 pass, 1 violations, 2 unreadable input.")
    p.add_argument("trace", metavar="TRACE.jsonl", help="traces in simulref's JSON Lines format")
    p.add_argument("-k", "--k", dest="k", type=positive_int, default=None, metavar="K",
                   help="wait-k lag to check the schedule against (default: each trace's "
                        "settings.k; a trace without one, of another policy, gets no "
                        "schedule check)")
    p.add_argument("--against", metavar="REF.jsonl", default=None,
                   help="reference traces to compare with, position by position")
    p.set_defaults(run=run_verify)
    return p


def run_verify(args) -> int:
    return run_verify_cli(args.trace, k=args.k, against=args.against)


def run_verify_cli(trace_path, k: int | None = None, against=None, out=None, err=None) -> int:
    """``simulref verify``: check every trace in ``trace_path`` (and compare it with the
    trace at the same position in ``against``). Prints one line per trace and per problem
    to ``out`` (default stdout); an unreadable file is one line on ``err`` (default
    stderr). Returns 0 when everything passes, 1 on violations or divergences, 2 when an
    input cannot be read."""
    from simulref.checks import check_int
    from simulref.verify import check_trace, compare_traces

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    check_int("k", k, minimum=1, none_ok=True)
    loaded = _load_for_verify(trace_path, err)
    if loaded is None:
        return EXIT_UNREADABLE
    references = None
    if against is not None:
        references = _load_for_verify(against, err)
        if references is None:
            return EXIT_UNREADABLE
    failed = 0
    if references is not None and len(references) != len(loaded):
        failed += 1
        print(f"FAIL: {against} holds {len(references)} trace(s), {trace_path} holds "
              f"{len(loaded)}", file=out)
    for index, (trace, problems) in enumerate(loaded):
        problems = problems + check_trace(trace, k)
        divergence = None
        if references is not None and index < len(references):
            divergence = compare_traces(references[index][0], trace)
        if not problems and divergence is None:
            print(f"trace {index}: PASS", file=out)
            continue
        failed += 1
        print(f"trace {index}: FAIL", file=out)
        for problem in problems:
            print(f"  {problem}", file=out)
        if divergence is not None:
            print("  " + str(divergence).replace("\n", "\n  "), file=out)
    if failed:
        print(f"FAIL ({failed} of {len(loaded)} trace(s))", file=out)
        return EXIT_VIOLATIONS
    print(f"PASS ({len(loaded)} trace(s))", file=out)
    return EXIT_PASS


def _load_for_verify(path, err) -> list | None:
    """verify.load_traces(path), or None after one line on ``err`` saying why not."""
    from simulref.verify import load_traces

    try:
        loaded = load_traces(path)
    except OSError as error:
        print(f"simulref verify: {path}: cannot read ({error.strerror or error})", file=err)
        return None
    except (ValueError, TypeError) as error:  # UnicodeDecodeError is a ValueError
        print(f"simulref verify: {path}: {error}", file=err)
        return None
    if not loaded:
        print(f"simulref verify: {path}: no trace in the file", file=err)
        return None
    return loaded
