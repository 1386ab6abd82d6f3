"""The ``simulref`` command.

Each subcommand is registered by one small ``add_<name>(subparsers)`` function listed
in :data:`COMMANDS`; it adds its parser and sets ``run`` to the function that executes
it. Adding a subcommand is: write ``add_x`` + ``run_x``, decorate ``add_x`` with
``@command``.

User errors (bad options, unreadable or malformed data, unknown model) end with exit
code 2 and one line on stderr; Ctrl-C ends with exit code 130 after a final render.
"""

from __future__ import annotations

import argparse
import functools
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from simulref import blas
from simulref.checks import parse_int
from simulref.config import DTYPES, ENGINES, LAYOUTS, DecodeConfig
from simulref.limits import MAX_POSITION
from simulref.train_cli import add_train_parser

WATCH_MODES = ("live", "side-by-side", "trace")
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block) and exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse's API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- option types --------------------------------------------------------------------


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            return parse_int(text, minimum=minimum)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def batch_size(text: str) -> int | str:
    """'auto' or an int >= 1."""
    return "auto" if text == "auto" else positive_int(text)


def memory_size(text: str) -> int:
    from simulref.batch_memory import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def target_start(text: str) -> int | str:
    """'auto' or a position >= 0 and below :data:`simulref.limits.MAX_POSITION` (a bound
    that needs no model; the model's own context length is checked once it is loaded)."""
    if text == "auto":
        return "auto"
    try:
        return parse_int(text, minimum=0, maximum=MAX_POSITION)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer in [0, {MAX_POSITION}]"
                                         f", got {text!r}") from None


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


# --- source words ------------------------------------------------------------------------

_SPACE = re.compile(rb"[ \t\n\r\f\v]+")


def words_from_chunks(chunks: Iterable[bytes]) -> Iterator[str]:
    """Words from a byte stream as soon as each is complete (followed by whitespace or
    the end). Works on bytes so a UTF-8 character split across chunks stays whole."""
    pending = b""
    for chunk in chunks:
        parts = _SPACE.split(pending + chunk)
        pending = parts.pop()  # the last part may continue in the next chunk
        for part in parts:
            if part:
                yield part.decode("utf-8", errors="replace")
    if pending:
        yield pending.decode("utf-8", errors="replace")


def words_from_stream(stream) -> Iterator[str]:
    """Words from ``stream`` as they arrive. A real file descriptor is read with
    ``os.read`` (returns whatever is there, no buffering that would wait for more); other
    streams line by line."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is not None:
        yield from words_from_chunks(iter(lambda: os.read(fd, 4096), b""))
    else:
        for line in iter(stream.readline, ""):
            yield from line.split()


def paced(words: Iterable[str], delay: float, sleep: Callable[[float], None] = time.sleep):
    """Yield ``words`` with ``delay`` seconds between them (a replayed live source)."""
    for i, word in enumerate(words):
        if i and delay:
            sleep(delay)
        yield word


def require_words(words: Iterable[str], what: str) -> Iterator[str]:
    """Pass words through; a source that ends without one is a usage error."""
    empty = True
    for word in words:
        empty = False
        yield word
    if empty:
        raise UsageError(f"{what}: no source words")


class Arrivals:
    """Pulls words from a (possibly blocking) iterator on a thread, so a display can
    show words that arrived before the policy reads them. Iterating yields the words
    in order and blocks while none has arrived: the decoder still waits for the
    source, which is what keeps wait-k honest when the input stalls."""

    _END = object()

    def __init__(self, words: Iterable[str]):
        self.words: list[str] = []
        self.ended = False
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(iter(words),), daemon=True)
        self._thread.start()

    def _pump(self, words: Iterator[str]) -> None:
        try:
            for word in words:
                self.words.append(word)
                self._queue.put(word)
        except BaseException as error:  # handed to the consumer, raised there
            self._queue.put(error)
        finally:
            self.ended = True
            self._queue.put(self._END)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def source_words(text: str | None, stdin=None) -> Iterable[str]:
    """The source: TEXT's words, or words read from stdin as they arrive (``-``/none).
    Stdin redirected from a regular file (``< source.txt``) is read whole: nothing more
    will arrive, and a known source can be checked against the context up front."""
    if text is None or text == "-":
        stream = stdin if stdin is not None else sys.stdin
        if _is_regular_file(stream):
            words = stream.buffer.read().decode("utf-8", errors="replace").split()
            if not words:
                raise UsageError("stdin: no source words")
            return words
        return require_words(words_from_stream(stream), "stdin")
    words = text.split()
    if not words:
        raise UsageError("TEXT: expected at least one word")
    return words


def _source_name(text: str | None) -> str:
    return "stdin" if text is None or text == "-" else "TEXT"


def _is_regular_file(stream) -> bool:
    import stat

    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode) and hasattr(stream, "buffer")
    except (AttributeError, OSError, ValueError):
        return False


# --- output ------------------------------------------------------------------------------


def stdout_console(**options):
    """A rich Console for stdout whose reader going away (``simulref ... | head``) raises
    BrokenPipeError like a plain print does, so that every subcommand ends the same way
    (exit 141, see :func:`main`); rich's own handling exits with status 1."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    return _Console(**options)


# --- models ------------------------------------------------------------------------------


def load_model(spec: str | None, dtype: str | None = None, adapter: str | None = None):
    """(model, tokenizer) for a preset name or a path; a bad one is a usage error."""
    from simulref import models

    name = spec or models.DEFAULT_PRESET
    if adapter is not None:
        from simulref.adapters import check_adapter

        try:
            check_adapter(adapter)  # a missing adapter costs no model load
        except FileNotFoundError as error:
            raise UsageError(f"--adapter {adapter}: {error}") from None
    try:
        return models.load(name, dtype, adapter=adapter)
    except (OSError, ValueError, models.DownloadError) as error:
        raise UsageError(f"--model {name}: {error}") from None


def check_context(model, tokenizer, source, args, *, what: str = "TEXT") -> None:
    """Refuse a run that cannot fit in the model's context (see :mod:`simulref.limits`),
    before anything is decoded: a known source (a list of words) as a whole, and an
    explicit --target-start; a live stream only for the latter."""
    from simulref import limits

    need = None
    if isinstance(source, list):
        need = limits.need_of(tokenizer, source, system=args.system)
    try:
        limits.check_fits(need, limits.context_length(model), target_start=args.target_start,
                          assumed=limits.declared_context_length(model) is None)
    except limits.ContextError as error:
        argument = "--target-start" if error.argument == "target_start" else what
        raise UsageError(f"{argument}: {error}") from None


def model_name(spec: str | None) -> str:
    from simulref import models

    return spec or models.DEFAULT_PRESET


def decode_config(args, **overrides) -> DecodeConfig:
    """The decode options the command line gave (``overrides`` for eval's runs)."""
    options = dict(k=args.k, system=args.system, layout=args.layout,
                   target_start=args.target_start,
                   max_tokens_per_word=args.max_tokens_per_word,
                   stop_at_first_eos=args.stop_at_first_eos, engine=args.engine)
    options.update(overrides)
    try:
        return DecodeConfig(**options)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


def rebase_times(trace, t0: float):
    from simulref.evaluate import rebase_times

    return rebase_times(trace, t0)


def trace_settings(args, source, model):
    """The settings of a run of the command line's options over ``source``."""
    from simulref.decoder import engine_name

    config = decode_config(args)
    return config.settings(model_name(args.model),
                           engine=engine_name(config, model, isinstance(source, Sequence)),
                           **({"adapter": args.adapter} if args.adapter else {}))


def _default_system() -> str:
    from simulref.prompt import DEFAULT_SYSTEM

    return DEFAULT_SYSTEM


def add_model_options(parser: argparse.ArgumentParser, *, many: bool = False) -> None:
    """--model, -k, --system, --layout, --target-start (+ decoder knobs)."""
    parser.add_argument("--model", metavar="PRESET|PATH", default=None,
                        help="model preset name or a GGUF file / mlx-lm directory "
                             "(default: the default preset; see `simulref models`)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weights dtype (default: float32 on CPU, quantized on a GPU)")
    parser.add_argument("--adapter", metavar="DIR", default=None,
                        help="LoRA adapter directory to apply (what `simulref train` writes)")
    if many:
        parser.add_argument("-k", "--k", dest="k", type=positive_int, nargs="+",
                            metavar="K", default=None,
                            help="wait-k values (default: 1 3 5 7 9)")
        parser.add_argument("--layout", choices=LAYOUTS, nargs="+", action="extend",
                            default=None, help="cache layouts to compare (default: group)")
    else:
        parser.add_argument("-k", "--k", dest="k", type=positive_int, default=3,
                            help="words read before the first write (default: 3)")
        parser.add_argument("--layout", choices=LAYOUTS, default="group",
                            help="cache layout (default: group)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="how tokens reach the model (default: auto: prefilled for a "
                             "known source in the group layout, else incremental; every "
                             "engine gives the same trace)")
    parser.add_argument("--system", default=None,
                        help="the instruction (default: translate English to French)")
    parser.add_argument("--target-start", type=target_start, default="auto",
                        metavar="auto|INT",
                        help="first position of the target group (default: auto)")
    parser.add_argument("--max-tokens-per-word", type=positive_int, default=50, metavar="N",
                        help="end a target word after N tokens (default: 50)")
    parser.add_argument("--stop-at-first-eos", action="store_true",
                        help="stop at the first EOS even before the source ended "
                             "(default: drop it and read on)")


# --- registry ----------------------------------------------------------------------------

COMMANDS: list[Callable] = []


def command(add: Callable) -> Callable:
    """Register ``add(subparsers)`` as a subcommand."""
    COMMANDS.append(add)
    return add


@command
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
                        help="print the trace as JSON Lines instead of the translation")
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
    model, tokenizer = load_model(args.model, args.dtype, args.adapter)
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


@command
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
                   help="also write the trace to FILE.jsonl")
    p.set_defaults(run=run_watch)


def watch(events: Iterator, arrivals: Arrivals, view: Callable, console) -> tuple[list, bool]:
    """Drain ``events`` while showing ``view(events so far, words arrived)`` live on a
    terminal; elsewhere (a pipe, a file) print only the final frame."""
    from rich.live import Live

    shown: list = []

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


def run_watch(args) -> int:
    from simulref.trace import Read, Trace, write_traces
    from simulref.views import VIEWS, trace_view

    if args.delay and (args.text is None or args.text == "-"):
        raise UsageError("--delay: only with a fixed TEXT (stdin sets its own pace)")
    if args.save is not None:
        _check_writable(args.save, "--save")
    source = source_words(args.text)
    model, tokenizer = load_model(args.model, args.dtype, args.adapter)
    check_context(model, tokenizer, source, args, what=_source_name(args.text))
    if args.delay:
        source = paced(source, args.delay)
    start = time.monotonic()
    arrivals = Arrivals(source)
    view = VIEWS[args.mode]
    if view is trace_view:
        view = functools.partial(trace_view, t0=start)
    events, interrupted = watch(stream_events(args, arrivals, model, tokenizer), arrivals,
                                view, stdout_console())
    if args.save is not None:
        words = tuple(e.word for e in events if isinstance(e, Read))
        trace = Trace(trace_settings(args, arrivals, model), words, tuple(events))
        save_trace(args.save, rebase_times(trace, start), "--save", write_traces)
    return EXIT_INTERRUPTED if interrupted else 0


def _check_writable(path: str, option: str) -> None:
    """Refuse, before any model loads, an output file that cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{option}: {path} is a directory; expected a file name")
    if target.exists() and not os.access(target, os.W_OK):
        raise UsageError(f"{option}: cannot write to {path} (not writable)")
    parent = target.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"{option}: cannot write to {path} (no writable directory {parent})")


def save_trace(path: str, trace, option: str, write: Callable) -> None:
    """``write(path, [trace])``; when that fails late (the directory went away, the disk is
    full), the finished trace goes to a fresh file in the temporary directory instead, and
    the error names both, so that a translation is never lost to its last step."""
    try:
        write(path, [trace])
    except OSError as error:
        import tempfile

        handle, rescue = tempfile.mkstemp(prefix="simulref-trace-", suffix=".jsonl")
        os.close(handle)
        write(rescue, [trace])
        raise UsageError(f"{option}: cannot write to {path} ({error.strerror or error}); "
                         f"the trace was saved to {rescue}") from None


@command
def add_eval(subparsers) -> None:
    from simulref.evaluate import DATASETS

    p = subparsers.add_parser(
        "eval", help="score quality and latency over a parallel TSV file",
        description="For each layout and k: BLEU, chrF, AP, AL, LAAL, DAL, ATD and tokens/s "
                    "over DATA (source<TAB>reference per line), plus an offline run. "
                    "Resumable: rerun with the same --out to continue.")
    data = p.add_mutually_exclusive_group()
    data.add_argument("data", nargs="?", metavar="DATA.tsv", help="source<TAB>reference lines")
    data.add_argument("--dataset", choices=tuple(DATASETS), default=None,
                      help="a bundled dataset instead of DATA")
    add_model_options(p, many=True)
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="only the first N sentence pairs")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output directory (default: eval-<data>-<model>)")
    p.add_argument("--plot-sentence", type=non_negative_int, default=0, metavar="N",
                   help="sentence whose read/write staircase is plotted (default: 0)")
    p.add_argument("--no-offline", action="store_true", help="skip the offline run")
    p.add_argument("--word-duration", type=positive_float, default=0.4, metavar="SECONDS",
                   help="source pace assumed by the computation-aware latency "
                        "(default: 0.4 s per word)")
    p.add_argument("--batch-size", type=batch_size, default="auto", metavar="N",
                   help="sentences decoded together, every run's in one continuous batch "
                        "(default: auto, from the device and memory, printed at start; "
                        "1: one at a time)")
    p.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                   help="cap on the batch's KV cache, e.g. 2GiB (default: a quarter of "
                        "the device's or the free memory)")
    # Over several ranks (under mlx.launch; simulref.distributed, docs/distributed.md).
    p.add_argument("--gather", choices=("auto", "files", "network"), default="auto",
                   help="under mlx.launch, how rank 0 gets the other ranks' records: "
                        "files (a shared --out), network (mx.distributed) or auto (files "
                        "when every rank sees the others' files; default); a single "
                        "process ignores it")
    p.set_defaults(run=run_eval)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "model"


def run_eval(args) -> int:
    from simulref import evaluate

    if args.data is None and args.dataset is None:
        raise UsageError("DATA: give a DATA.tsv file or --dataset NAME")
    path = evaluate.dataset_path(args.dataset) if args.dataset else Path(args.data)
    try:
        pairs = evaluate.read_pairs(path)
    except evaluate.DataError as error:
        raise UsageError(str(error)) from None
    if args.limit is not None:
        pairs = pairs[: args.limit]
    if args.plot_sentence >= len(pairs):
        raise UsageError(f"--plot-sentence: expected an index below {len(pairs)}, "
                         f"got {args.plot_sentence}")
    ks = args.k or list(evaluate.DEFAULT_KS)
    layouts = args.layout or ["group"]
    system = args.system or evaluate.default_system(args.dataset, path)
    # Every run's options are checked before the model loads.
    base, *_ = [decode_config(args, k=ks[0], layout=layout, system=system) for layout in layouts]
    name = model_name(args.model)
    out = Path(args.out or f"eval-{args.dataset or path.stem}-{_slug(Path(name).name)}")
    settings = {
        "model": name, "system": system, "target_start": args.target_start,
        "max_tokens_per_word": args.max_tokens_per_word,
        "stop_at_first_eos": args.stop_at_first_eos,
        "data": args.dataset or str(path), "data_sha256": evaluate.sha256_of(pairs),
        "sentences": len(pairs), "ks": ks, "layouts": layouts,
        "word_duration": args.word_duration,
        **({"adapter": args.adapter} if args.adapter else {}),
    }
    # --- over several ranks (simulref.distributed; docs/distributed.md) ---------------
    from simulref import distributed

    ranks = distributed.join()
    if ranks is not None:
        return _evaluate_ranks(args, evaluate, distributed, ranks, pairs, out, settings, ks,
                               layouts, base)
    # --- one process ----------------------------------------------------------------
    try:
        evaluate.check_out_dir(out, settings, write=False)  # written once the run starts
        lock = evaluate.lock_out_dir(out)
    except evaluate.DataError as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        raise UsageError(f"--out {out}: cannot use it as the output directory "
                         f"({error.strerror or error})") from None
    with lock:
        return _evaluate(args, evaluate, pairs, out, settings, ks, layouts, base)


# --- over several ranks (simulref.distributed; docs/distributed.md) -------------------


def _evaluate_ranks(args, evaluate, distributed, ranks, pairs, out: Path, settings: dict, ks,
                    layouts, base: DecodeConfig) -> int:
    """The collective checks (before the model loads), then :func:`_evaluate` with the
    plan of this rank; a lost rank ends it with exit code 1 (records kept)."""
    specs = evaluate.run_specs(layouts, ks, offline=not args.no_offline)
    compared = distributed.compared_settings(settings, specs, dtype=args.dtype,
                                             engine=args.engine)
    try:
        try:
            lock, plan = distributed.prepare(ranks, out, settings, compared, specs,
                                             [p.source for p in pairs], args.gather)
        except evaluate.DataError as error:
            raise UsageError(f"{ranks.tag}: {error}") from None
        with lock:
            return _evaluate(args, evaluate, pairs, out, settings, ks, layouts, base, plan)
    except distributed.RankLost as error:
        print(f"simulref eval: {error}; the records so far are kept: rerun the same "
              f"command to finish", file=sys.stderr)
        return 1


# --- one process (and each rank's own part) ---------------------------------------------


def _evaluate(args, evaluate, pairs, out: Path, settings: dict, ks, layouts,
              base: DecodeConfig, plan=None) -> int:
    model, tokenizer = load_model(args.model, args.dtype, args.adapter)
    system_args = argparse.Namespace(system=settings["system"], target_start=args.target_start)
    for pair in pairs:
        check_context(model, tokenizer, pair.source.split(), system_args,
                      what=f"{settings['data']}:{pair.line}")
    size, line = _batch_size(args, model, tokenizer, pairs, settings["system"])
    print(line if plan is None else plan.tagged(line), file=sys.stderr)
    peak = [0]
    job = evaluate.Evaluation(
        model=model, tokenizer=tokenizer, pairs=pairs,
        specs=evaluate.run_specs(layouts, ks, offline=not args.no_offline), out=out,
        settings=settings, config=base, word_duration=args.word_duration, batch_size=size,
        on_batch=lambda f: peak.__setitem__(0, max(peak[0], f.cache_bytes)),
        **(plan.job_options() if plan is not None else {}),
    )
    start = time.monotonic()
    try:
        if plan is None:
            summaries = _run_with_progress(job)
        else:  # a rank: plain lines, each naming the rank
            def say(line: str) -> None:
                print(plan.tagged(line), file=sys.stderr, flush=True)

            summaries = plan.run(job, PlainProgress(say), say)
            if summaries is None:  # not rank 0: rank 0 writes the results
                return 0
    except KeyboardInterrupt:
        print(f"simulref eval: interrupted; rerun with --out {out} to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"simulref eval: decoded in {time.monotonic() - start:.0f} s"
          + (f", peak batch KV cache {peak[0] / 2**20:.0f} MiB" if size > 1 else "")
          + _peak_memory(), file=sys.stderr)
    plots = evaluate.write_plots(job, summaries, sentence=args.plot_sentence)
    console = stdout_console()
    console.print(evaluate.results_table(summaries))
    console.print(f"results: {out / 'results.json'}")
    for plot in plots:
        console.print(f"plot: {plot}")
    return 0


def _batch_size(args, model, tokenizer, pairs, system: str) -> tuple[int, str]:
    """--batch-size (auto: from the device), capped by --max-memory, and the line that
    says so."""
    from simulref import limits
    from simulref.batch_memory import choose_batch_size

    longest = max(limits.need_of(tokenizer, p.source.split(), system=system).prompt
                  for p in pairs)
    wanted = None if args.batch_size == "auto" else args.batch_size
    size, line = choose_batch_size(model, longest, wanted=wanted, max_memory=args.max_memory)
    return size, f"simulref eval: {line}"


def _peak_memory() -> str:
    import mlx.core as mx

    peak = getattr(mx, "get_peak_memory", None)
    return f", peak MLX memory {peak() / 2**20:.0f} MiB" if peak else ""


_NO_RUN_YET = object()


class PlainProgress:
    """Progress for a log or a pipe (rich draws nothing without a terminal): one line on
    ``write`` at the start of each run, then at most one every ``interval`` seconds of
    ``clock``, and at the end of each run: sentences done, rate and time left."""

    def __init__(self, write: Callable[[str], None], clock: Callable[[], float] = time.monotonic,
                 interval: float = 5.0):
        self.write, self.clock, self.interval = write, clock, interval
        self.spec = _NO_RUN_YET  # (a batch over every run reports spec None)
        self.start = self.last = 0.0
        self.first = 0

    def __call__(self, spec, done: int, total: int) -> None:
        now = self.clock()
        label = _run_label(spec)
        if spec != self.spec:  # a new run; its first call gives the sentences resumed
            self.spec, self.start, self.last, self.first = spec, now, now, done
            self.write(f"simulref eval: {label}: {done}/{total} sentences")
            return
        if now - self.last < self.interval and done < total:
            return
        self.last = now
        decoded, elapsed = done - self.first, now - self.start
        rate = decoded / elapsed if elapsed > 0 else 0.0
        eta = f"{(total - done) / rate:.0f} s" if rate > 0 else "?"
        self.write(f"simulref eval: {label}: {done}/{total} sentences, "
                   f"{rate:.2f} sentences/s, eta {eta}")


def _run_label(spec) -> str:
    if spec is None:  # a batch over every run
        return "all runs"
    return "offline" if spec.offline else f"{spec.layout} k={spec.k}"


def _run_with_progress(job) -> list[dict]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed or 0:.2f} sentences/s")

    columns = (TextColumn("{task.description:>16}"), BarColumn(), MofNCompleteColumn(),
               Rate(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    tasks: dict = {}
    console = Console(stderr=True)
    if not console.is_terminal:
        return job.run(PlainProgress(lambda line: print(line, file=sys.stderr, flush=True)))
    with Progress(*columns, console=console) as progress:
        def on_progress(spec, done: int, total: int) -> None:
            if spec not in tasks:
                tasks[spec] = progress.add_task(_run_label(spec), total=total, completed=done)
            progress.update(tasks[spec], completed=done)

        return job.run(on_progress)


@command
def add_models(subparsers) -> None:
    p = subparsers.add_parser("models", help="list model presets and which are cached",
                              description="List model presets, where they are cached, sizes.")
    p.set_defaults(run=run_models)


def preset_rows() -> list[dict]:
    """Name, description, size, cache path and whether it is cached, per preset."""
    from simulref import models

    rows = []
    for name, preset in models.PRESETS.items():
        path = models.cache_dir() / preset.filename
        cached = path.is_file() and path.stat().st_size == preset.size
        rows.append({"name": name, "default": name == models.DEFAULT_PRESET,
                     "cached": cached, "size": preset.size, "path": path,
                     "description": preset.description})
    return rows


def run_models(args) -> int:
    from rich.table import Table

    from simulref import models

    table = Table(title="simulref model presets", title_justify="left")
    table.add_column("preset", no_wrap=True)
    table.add_column("cached")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("description")
    for row in preset_rows():
        table.add_row(row["name"] + (" (default)" if row["default"] else ""),
                      "yes" if row["cached"] else "no", _size(row["size"]),
                      row["description"])
    from simulref import download

    console = stdout_console()
    console.print(table)
    directory = models.cache_dir()
    freed = download.clean_stale_downloads(directory)
    if freed:
        console.print(f"removed {_size(freed)} left by interrupted downloads")
    size = _size(download.cache_size(directory)) or "empty"
    console.print(f"cache: {directory} ({size}; set SIMULREF_HOME to move it)", soft_wrap=True)
    console.print("--model also takes a GGUF file, an mlx-lm model directory or a repo "
                  "name (org/name).", soft_wrap=True)
    return 0


def _size(n: int | None) -> str:
    if not n:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


@command
def add_trace(subparsers) -> None:
    p = subparsers.add_parser("trace", help="render stored traces compactly",
                              description="Print each trace in FILE.jsonl as one line "
                                          "(R read, W write, E dropped EOS, F finish).")
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


EXIT_PASS = 0
EXIT_VIOLATIONS = 1
EXIT_UNREADABLE = EXIT_USAGE


@command
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
                        "settings.k; none: no schedule check)")
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


command(add_train_parser)


# --- entry point -------------------------------------------------------------------------


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


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # run as the command: restart with OpenBLAS preloaded (see simulref.blas)
        blas.reexec_with_openblas()
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
    except KeyboardInterrupt:
        print("simulref: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`simulref ... | head`): not an error worth a traceback.
        # Every subcommand ends so, with 128 + SIGPIPE, what a shell reports for a
        # program killed by the signal (rich's own handling would exit 1).
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the exit flush then goes nowhere
        except (OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
