"""``simulref train``: the command-line face of :func:`simulref.finetune.train`.

Every option is checked, and the data read, before the model loads: a bad option costs no
model load.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simulref.cli.args import (
    DECODE_OPTIONS,
    MODEL_OPTIONS,
    UsageError,
    load_model,
    model_name,
    positive_int,
)
from simulref.finetune import CHECKPOINT_FILE, MODES

TRAIN_SETS = ("postgres-en-fr", "postgres-en-de")  # simulref/data/train/<name>.{train,valid}.tsv


def train_file(name: str, part: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("simulref") / "data" / "train" / f"{name}.{part}.tsv"))


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="LoRA fine-tuning with the decoder's wait-k masks (or plain batch SFT)",
        description="Fine-tune a model with LoRA on source<TAB>reference pairs and write an "
                    "mlx-lm adapter directory (adapters.safetensors, adapter_config.json) to "
                    "--out. --mode streaming trains each target word on the source words "
                    "wait-k would have read (the decoder's own masks and group positions); "
                    "--mode batch shows every query the whole source. Resumable (--resume).")
    MODEL_OPTIONS["model"].add(p, help="base model (default: the default preset; see "
                                        "`simulref models`)")
    MODEL_OPTIONS["dtype"].add(p)
    p.add_argument("--data", default="postgres-en-fr", metavar="NAME|FILE.tsv",
                   help=f"training pairs: {' or '.join(TRAIN_SETS)} (bundled, "
                        "simulref/data/train) or a TSV file (default: %(default)s)")
    p.add_argument("--valid-data", default=None, metavar="FILE.tsv",
                   help="validation pairs (default: the bundled set's valid file; none for "
                        "a FILE)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="only the first N training pairs")
    p.add_argument("--mode", choices=MODES, default="streaming",
                   help="streaming: wait-k masks; batch: whole source (default: %(default)s)")
    DECODE_OPTIONS["k"].add(p, many=True, default=[3],
                            help="wait-k lag(s) of streaming mode; with several, each pair "
                                 "draws one (default: 3)")
    DECODE_OPTIONS["target_start"].add(p)
    DECODE_OPTIONS["system"].add(p, help="the instruction (default: translate to the data's "
                                         "target language)")
    p.add_argument("--iters", type=positive_int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=8, help="pairs per step")
    p.add_argument("--lr", type=_positive_number, default=1e-4, help="Adam learning rate")
    p.add_argument("--rank", type=positive_int, default=8, help="LoRA rank")
    p.add_argument("--lora-scale", type=_positive_number, default=10.0,
                   help="LoRA scale (mlx-lm's 'scale')")
    p.add_argument("--lora-layers", type=positive_int, default=16, metavar="N",
                   help="LoRA on the last N transformer blocks (default: 16)")
    p.add_argument("--seed", type=int, default=0,
                   help="LoRA initialisation, data order and k draws (the same seed gives "
                        "the same adapter)")
    p.add_argument("--steps-per-save", type=positive_int, default=25, metavar="N",
                   help="checkpoint every N steps (and at the end)")
    p.add_argument("--steps-per-eval", type=positive_int, default=None, metavar="N",
                   help="also log the validation loss every N steps (a loss curve)")
    p.add_argument("--max-minutes", type=_positive_number, default=None, metavar="M",
                   help="stop (and save) after the step that passes M minutes")
    p.add_argument("--resume", action="store_true",
                   help="continue the checkpoint in --out")
    p.add_argument("--out", required=True, metavar="DIR", help="adapter directory to write")
    p.set_defaults(run=run_train)
    return p


def _read(path: Path, option: str):
    """The pairs of a training TSV; a source of a bundled test set or a reserved one is
    refused (it would leak the evaluation into the model)."""
    from simulref import databuild, evaluate

    try:
        pairs = evaluate.read_pairs(path)
    except evaluate.DataError as error:
        raise UsageError(f"{option}: {error}") from None
    leak = databuild.first_held_out(pairs, databuild.training_guard())
    if leak is not None:
        raise UsageError(f"{option}: {path}:{leak[0]}: source {leak[1]!r} is held out from "
                         "training (a bundled test-set or reserved source, compared by "
                         "its words)")
    return pairs


def _check_model(spec: str | None) -> None:
    """An adapter preset already carries a LoRA: train its base instead (before it
    loads, and before --out is made)."""
    from simulref.adapters import ADAPTER_PRESETS

    if spec in ADAPTER_PRESETS:
        raise UsageError(f"--model {spec}: an adapter preset already carries a LoRA "
                         f"adapter; train on its base instead (--model "
                         f"{ADAPTER_PRESETS[spec].base})")


def _check_out(out: Path, args) -> None:
    """--out, before the model loads: a directory (or one still to be made) that takes
    files; an existing checkpoint only with --resume, and then one below --iters. It is
    not made here: training makes it once the model loaded and every pair fits."""
    from simulref import atomic, finetune

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory")
    try:
        atomic.probe_writable(out)
    except atomic.WriteError as error:
        raise UsageError(f"--out: {error}") from None
    if not (out / finetune.CHECKPOINT_FILE).is_file():
        return
    if not args.resume:
        raise UsageError(f"--out: {out} already holds a checkpoint; add --resume to "
                         f"continue it or choose another directory")
    try:
        step, _ = finetune.checkpoint_info(out)
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise UsageError(f"--resume: {out / finetune.CHECKPOINT_FILE} cannot be read "
                         f"({' '.join(str(error).split())}); remove it to start over") from None
    if step >= args.iters:
        raise UsageError(f"--iters: the checkpoint in {out} is at step {step}, and --iters "
                         f"is {args.iters}: nothing to train; give --iters above {step} to "
                         f"train on")


def _context_error(error, data, valid) -> UsageError:
    """simulref.limits' refusal of a training pair (or --target-start) as the command
    line names it: the option, and the file and line of the pair. ``data``, ``valid``:
    (pairs, path) of --data and --valid-data."""
    if error.argument == "target_start":
        return UsageError(f"--target-start: {str(error).removeprefix('target_start: ')}")
    option, (pairs, path) = (("--valid-data", valid) if error.argument == "valid_pairs"
                             else ("--data", data))
    why = str(error).split(": ", 1)[1]  # after "pairs[i]: "
    return UsageError(f"{option}: {path}:{pairs[error.index].line}: {why}")


def run_train(args) -> int:
    from simulref import evaluate, finetune, limits

    bundled = args.data in TRAIN_SETS
    path = train_file(args.data, "train") if bundled else Path(args.data)
    if not bundled and not path.is_file():
        raise UsageError(f"--data: expected {' or '.join(TRAIN_SETS)} or a TSV file, "
                         f"got {args.data!r} (no such file)")
    _check_model(args.model)
    pairs = _read(path, "--data")
    if args.limit is not None:
        pairs = pairs[: args.limit]
    if len(pairs) < args.batch_size:
        raise UsageError(f"--batch-size: expected at most the {len(pairs)} training pairs, "
                         f"got {args.batch_size}")
    valid_path = (Path(args.valid_data) if args.valid_data
                  else train_file(args.data, "valid") if bundled else None)
    valid = _read(valid_path, "--valid-data") if valid_path else []
    out = Path(args.out)
    _check_out(out, args)
    system = args.system or evaluate.default_system(None, path)
    name = model_name(args.model)

    model, tokenizer = load_model(args.model, args.dtype)
    lora = finetune.LoraConfig(rank=args.rank, scale=args.lora_scale,
                               num_layers=args.lora_layers)
    try:
        summary = _train_with_progress(args, model, tokenizer,
                                       [(p.source, p.reference) for p in pairs],
                                       [(p.source, p.reference) for p in valid], lora, system,
                                       name, str(args.data))
    except limits.ContextError as error:  # the check translate makes, before any step
        raise _context_error(error, (pairs, path), (valid, valid_path)) from None
    except ValueError as error:  # a checkpoint from other settings, an untokenizable pair
        raise UsageError(str(error)) from None
    except KeyboardInterrupt:
        print(f"simulref train: interrupted; the last checkpoint is in {out} "
              f"(rerun with --resume)", file=sys.stderr)
        return 130
    before, after = summary["valid_before"], summary["valid_after"]
    valid_text = ("" if before is None else
                  f"; valid loss {before:.3f} -> {after:.3f}")
    resumed = (f" (resumed at step {summary['start_step']})" if summary["start_step"]
               else "")
    print(f"simulref train: {summary['steps']} steps{resumed} in {summary['seconds']:.0f} s"
          f"{valid_text}; adapter: {out} (use --model {name} --adapter {out})")
    return 0


def _train_with_progress(args, model, tokenizer, pairs, valid, lora, system, name, data):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from simulref import finetune

    console = Console(stderr=True)
    columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
               TimeElapsedColumn())
    # The bar starts with the first step: a refusal (a pair past the context, a resume
    # with other settings) stays the one line of a usage error.
    bar: list = []

    def on_step(p: finetune.Progress) -> None:
        if not bar:
            bar.append(Progress(*columns, console=console, transient=False))
            bar[0].start()
            bar.append(bar[0].add_task("train", total=args.iters, loss="-", speed="-"))
        progress, task = bar
        progress.update(task, completed=p.step, loss=f"{p.loss:.3f}",
                        speed=f"{p.tokens_per_s:.0f}")
        if not console.is_terminal:  # a log file gets one line per step
            console.print(f"step {p.step}/{p.iters} loss {p.loss:.3f} "
                          f"{p.tokens_per_s:.0f} tok/s {p.elapsed_s:.0f} s")

    try:
        return finetune.train(
            model, tokenizer, pairs, args.out, mode=args.mode, k=args.k,
            target_start=args.target_start, iters=args.iters, batch_size=args.batch_size,
            lr=args.lr, lora=lora, system=system, valid_pairs=valid, seed=args.seed,
            steps_per_save=args.steps_per_save, max_minutes=args.max_minutes,
            steps_per_eval=args.steps_per_eval,
            resume=args.resume, model_name=name, data_name=data, on_step=on_step)
    finally:
        if bar:
            bar[0].stop()


__all__ = ["CHECKPOINT_FILE", "add_train_parser", "run_train"]
