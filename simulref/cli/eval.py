"""``simulref eval``: quality and latency over a parallel TSV file, one run per layout
and k (plus offline), resumable, batched, and over several ranks under mlx.launch."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from simulref.cli.args import (
    EXIT_INTERRUPTED,
    UsageError,
    add_model_options,
    batch_size,
    check_adapter_option,
    check_context,
    check_engine,
    decode_config,
    load_model,
    memory_size,
    model_name,
    non_negative_int,
    positive_float,
    positive_int,
)
from simulref.cli.output import stdout_console
from simulref.config import DecodeConfig
from simulref.policy import ReadAll, WaitK, parse_policy


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
    from simulref.cli import eval_longform

    eval_longform.add_options(p)  # --longform --doc-size D (simulref.cli.eval_longform)
    p.set_defaults(run=run_eval)


def _policies(args) -> tuple[list[int], list[str]]:
    """The runs the options ask for: wait-k lags (-k, and --policy wait-k:...) and the
    other policies' text forms (--policy; read-all is the offline run, already there).
    Without -k and --policy: wait-k at evaluate.DEFAULT_KS."""
    from simulref import evaluate

    chosen = [policy for group in args.policy or [] for policy in group]
    ks = list(args.k or [])
    ks += [p.k for p in chosen if isinstance(p, WaitK)]
    others = [p.name for p in chosen if not isinstance(p, (WaitK, ReadAll))]
    if not ks and not chosen:
        ks = list(evaluate.DEFAULT_KS)
    return list(dict.fromkeys(ks)), list(dict.fromkeys(others))


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
    ks, policies = _policies(args)
    layouts = args.layout or ["group"]
    system = args.system or evaluate.default_system(args.dataset, path)
    # Every run's options are checked before the model loads.
    base, *_ = [decode_config(args, k=(ks or [3])[0], layout=layout, system=system,
                              policy=None) for layout in layouts]
    check_engine(base, known_source=True)  # every sentence is known up front
    for layout in layouts:
        for policy in policies:
            decode_config(args, layout=layout, system=system, policy=parse_policy(policy))
    from simulref.cli import eval_longform

    eval_longform.check(args, layouts)
    check_adapter_option(args.adapter)  # before its hash is taken, and before any load
    name = model_name(args.model)
    out = Path(args.out or f"eval-{args.dataset or path.stem}-{_slug(Path(name).name)}")
    # The one place an eval's settings are made (and so what a resume must match).
    settings = evaluate.eval_settings(
        base, model=name, dtype=args.dtype, adapter=args.adapter,
        data=args.dataset or str(path), pairs=pairs, ks=ks, layouts=layouts,
        policies=policies, word_duration=args.word_duration)
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


def _evaluate_ranks(args, evaluate, distributed, ranks, pairs, out: Path, settings: dict, ks,
                    layouts, base: DecodeConfig) -> int:
    """The collective checks (before the model loads), then :func:`_evaluate` with the
    plan of this rank; a lost rank ends it with exit code 1 (records kept)."""
    specs = evaluate.run_specs(layouts, ks, offline=not args.no_offline,
                               policies=settings.get("policies", ()))
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
        specs=evaluate.run_specs(layouts, ks, offline=not args.no_offline,
                                 policies=settings.get("policies", ())), out=out,
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
    longform = None
    if args.longform and plan is None:  # (not over ranks yet)
        from simulref.cli import eval_longform

        longform = eval_longform.run(args, model, tokenizer, pairs, base, ks, out)
    plots = evaluate.write_plots(job, summaries, sentence=args.plot_sentence)
    if longform is not None:
        plots += eval_longform.plot(summaries, longform, out)
    console = stdout_console()
    if not console.is_terminal:  # a log or a pipe: room for every column (rich's default: 80)
        console = stdout_console(width=120)
    console.print(evaluate.results_table(summaries))
    console.print(evaluate.omnisteval_table(summaries))
    if longform is not None:
        console.print(eval_longform.table(summaries, longform))
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
    if spec.offline:
        return "offline"
    return f"{spec.layout} k={spec.k}" if spec.k is not None else f"{spec.layout} {spec.policy}"


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
