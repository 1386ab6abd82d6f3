"""The ``simulref`` command: ``main`` and the parser.

One module per subcommand (``translate``, ``watch``, ``eval``, ``models``, ``trace``,
``verify``, ``train``), each with an ``add_<name>(subparsers)`` that adds its parser and
sets ``run`` to the function that executes it; :data:`COMMANDS` lists them in the order
``--help`` shows. The options several subcommands share, their types and their mapping
to :class:`~simulref.config.DecodeConfig` live in :mod:`simulref.cli.args`.

User errors (bad options, unreadable or malformed data, unknown model) end with exit
code 2 and one line on stderr; Ctrl-C ends with exit code 130 after a final render, and
SIGTERM (``timeout``, ``kill``) the same way with 143; a file or stdout that cannot be
written (a full disk, ``> /dev/full``) with one line and exit code 74, nothing
half-written; a reader gone away (``| head``) with 141.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from collections.abc import Sequence

from simulref import blas
from simulref.cli import eval as eval_command
from simulref.cli import models, trace, train, translate, verify, watch
from simulref.cli.args import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    EXIT_WRITE,
    UsageError,
    _default_system,
    _Parser,
)

COMMANDS = (translate.add_translate, watch.add_watch, eval_command.add_eval,
            models.add_models, trace.add_trace, verify.add_verify_parser,
            train.add_train_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="simulref",
                     description="LLM simultaneous translation (wait-k) on MLX.")
    from simulref import __version__

    parser.add_argument("--version", action="version", version=f"simulref {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND",
                                       parser_class=_Parser)
    for add in COMMANDS:
        add(subparsers)
    parser.commands = tuple(subparsers.choices)
    return parser


def _finish_defaults(args) -> None:
    """Defaults that depend on other options, and checks that span several options."""
    system = getattr(args, "system", None)
    if system is not None:
        if not system.strip():
            raise UsageError(f"--system: expected a non-empty instruction, got {system!r}")
        args.system = system.strip()  # the prompt keeps the instruction exactly: no padding
    if getattr(args, "system", "unset") is None and args.command in ("translate", "watch"):
        args.system = _default_system()
    start = getattr(args, "target_start", "auto")
    layouts = getattr(args, "layout", None)
    layouts = [layouts] if isinstance(layouts, str) else layouts or ["group"]
    if start != "auto" and any(layout != "group" for layout in layouts):
        raise UsageError(f"--target-start {start}: an explicit start applies to the group "
                         f"layout only (got --layout {' '.join(layouts)})")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be: every command ends on it
    as on Ctrl-C (a final render, the trace kept), then exits with 143."""


# errno values of a write that cannot succeed (a full disk, a quota, a read-only or
# failing device): an OSError of these without a file name came from writing stdout.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})


def _handle_sigterm(terminated: list):
    """Make SIGTERM raise :class:`Terminated` (and set ``terminated[0]``: a command that
    catches it as Ctrl-C returns 130, which then becomes 143). Returns the previous
    handler (None: none installed, e.g. off the main thread, where Python takes no
    signals)."""
    def on_sigterm(signum, frame) -> None:
        terminated[0] = True
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:
        return None


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the exit's flush of what could not be written
    (a reader gone away, a full disk) neither fails again nor prints a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # run as the command: restart with OpenBLAS preloaded (see simulref.blas)
        blas.reexec_with_openblas()
    terminated = [False]
    previous = _handle_sigterm(terminated)
    try:
        code = _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return EXIT_TERMINATED if terminated[0] and code == EXIT_INTERRUPTED else code


def _run(argv) -> int:
    from simulref.atomic import WriteError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            commands = ", ".join(parser.commands)
            print(f"simulref: error: a COMMAND is required ({commands}; see simulref --help)",
                  file=sys.stderr)
            return EXIT_USAGE
        _finish_defaults(args)
        code = args.run(args)
        sys.stdout.flush()  # here, so that a reader gone away ends like any broken pipe
        return code
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    except UsageError as error:
        print(f"simulref: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Terminated:
        print("simulref: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("simulref: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`simulref ... | head`): not an error worth a traceback.
        # Every subcommand ends so, with 128 + SIGPIPE, what a shell reports for a
        # program killed by the signal (rich's own handling would exit 1).
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except WriteError as error:  # a result file: the library left nothing half-written
        print(f"simulref: error: {error}", file=sys.stderr)
        return EXIT_WRITE
    except OSError as error:
        if error.filename is not None or error.errno not in WRITE_ERRNOS:
            raise
        _quiet_stdout()
        print(f"simulref: error: stdout: cannot write ({error.strerror or error})",
              file=sys.stderr)
        return EXIT_WRITE


if __name__ == "__main__":
    sys.exit(main())
