"""What the subcommands share: exit codes, the usage error, argument types, the model
and decode options (each declared once, with its mapping to
:class:`~simulref.config.DecodeConfig`), and model loading.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from simulref.checks import as_option, int_option
from simulref.config import DTYPES, ENGINES, LAYOUTS, DecodeConfig
from simulref.limits import parse_target_start
from simulref.policy import POLICY_SYNTAX, parse_policy

EXIT_USAGE = 2
# A file (or stdout) that could not be written: a full disk, a read-only filesystem.
# sysexits.h's EX_IOERR; its own code, apart from verify's 1 (violations) and 2.
EXIT_WRITE = 74
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141
EXIT_TERMINATED = 143  # 128 + SIGTERM: what a shell reports for a terminated program


class UsageError(Exception):
    """A problem with what the user asked for: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block) and exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse's API
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# The argument types: each a text parser of the library's (ValueError on bad text) made an
# argparse type by simulref.checks.as_option, so the library, the SimulEval agent and
# this command line check a value the same way, with the same message.
positive_int = int_option(minimum=1)
non_negative_int = int_option(minimum=0)
# 'auto' or a position below simulref.limits.MAX_POSITION (a bound that needs no model;
# the model's own context length is checked once it is loaded).
target_start = as_option(parse_target_start)


def batch_size(text: str) -> int | str:
    """'auto' or an int >= 1."""
    return "auto" if text == "auto" else positive_int(text)


def history_size(text: str) -> int | None:
    """'all' (None: as many pairs as the budget holds) or an int >= 0."""
    return None if text == "all" else non_negative_int(text)


def memory_size(text: str) -> int:
    from simulref.batch_memory import parse_size

    return as_option(parse_size)(text)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = non_negative_float(text)
    except argparse.ArgumentTypeError:
        value = 0.0  # one message for every value refused: -1 is no more ">= 0" than 0
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def parse_policy_grid(text: str) -> list:
    """Several policies of one family in one word, for eval: ``confidence:0.3,0.6`` is
    ``confidence:0.3`` and ``confidence:0.6``; the comma list is the first value after the
    family's name, options (``:chunk=2``) apply to each. ValueError as parse_policy's."""
    head, sep, rest = text.strip().partition(":")
    values, colon, options = rest.partition(":")
    if not sep or "," not in values:
        return [parse_policy(text)]
    if any(not value.strip() for value in values.split(",")):
        raise ValueError(f"policy: an empty value in {text!r}; expected {POLICY_SYNTAX}")
    return [parse_policy(f"{head}:{value.strip()}{colon}{options}")
            for value in values.split(",")]


# --- the shared options, each declared once -------------------------------------------


@dataclass(frozen=True)
class Option:
    """One command-line option: its flags and argparse keywords; ``many``: the keywords
    that change where a subcommand compares several values (eval's ``-k 1 3 5``)."""

    flags: tuple[str, ...]
    keywords: Mapping[str, Any]
    many: Mapping[str, Any] = field(default_factory=dict)

    def add(self, parser: argparse.ArgumentParser, *, many: bool = False, **changes) -> None:
        """Add the option to ``parser`` (``changes``: keywords of one subcommand's own,
        such as its help text)."""
        parser.add_argument(*self.flags, **{**self.keywords, **(self.many if many else {}),
                                            **changes})


MODEL_OPTIONS: dict[str, Option] = {
    "model": Option(("--model",), dict(
        metavar="PRESET|PATH", default=None,
        help="model preset name or a GGUF file / mlx-lm directory (default: the default "
             "preset; see `simulref models`)")),
    "dtype": Option(("--dtype",), dict(
        choices=DTYPES, default=None,
        help="weights dtype (default: float32 on CPU, quantized on a GPU)")),
    "adapter": Option(("--adapter",), dict(
        metavar="DIR", default=None,
        help="LoRA adapter directory to apply (what `simulref train` writes)")),
}

# Keyed by the DecodeConfig field each one sets (the parsed value's name too):
# decode_config() maps them all, so a new decode option is one line here and one field
# in DecodeConfig.
DECODE_OPTIONS: dict[str, Option] = {
    "k": Option(("-k", "--k"), dict(
        type=positive_int, default=3, help="words read before the first write (default: 3)"),
        many=dict(nargs="+", metavar="K", default=None,
                  help="wait-k values (default: 1 3 5 7 9)")),
    "policy": Option(("--policy",), dict(
        type=as_option(parse_policy), default=None, metavar="POLICY",
        help=f"the read/write policy instead of wait-k with -k: {POLICY_SYNTAX} "
             "(docs/policies.md)"),
        many=dict(type=as_option(parse_policy_grid), nargs="+", metavar="POLICY",
                  help="policies to compare, each with comma-separated values: "
                       "wait-k:1,3,5 confidence:0.3,0.6 local-agreement:2,3[:chunk=C] "
                       "(-k K... adds wait-k runs; default without --policy: -k 1 3 5 7 9)"
                  )),
    "layout": Option(("--layout",), dict(
        choices=LAYOUTS, default="group", help="cache layout (default: group)"),
        many=dict(nargs="+", action="extend", default=None,
                  help="cache layouts to compare (default: group)")),
    "engine": Option(("--engine",), dict(
        choices=ENGINES, default="auto",
        help="how tokens reach the model (default: auto: in the group layout, prefilled "
             "for a known source and fused for a live one, else incremental; every engine "
             "gives the same trace). A named engine is never swapped: prefilled needs a "
             "known source (TEXT, a file on stdin, eval), fused a live one (watch, a pipe "
             "on stdin); the other pairings are refused before the model loads")),
    "system": Option(("--system",), dict(
        default=None, help="the instruction (default: translate English to French)")),
    "target_start": Option(("--target-start",), dict(
        type=target_start, default="auto", metavar="auto|INT",
        help="first position of the target group (default: auto)")),
    "max_tokens_per_word": Option(("--max-tokens-per-word",), dict(
        type=positive_int, default=50, metavar="N",
        help="end a target word after N tokens (default: 50)")),
    "stop_at_first_eos": Option(("--stop-at-first-eos",), dict(
        action="store_true",
        help="stop at the first EOS even before the source ended (default: drop it and "
             "read on)")),
}


# Long-form decoding (simulref.longform) of watch and translate: not DecodeConfig
# fields, so kept apart from DECODE_OPTIONS (decode_config maps every one of those).
LONGFORM_OPTIONS: dict[str, Option] = {
    "longform": Option(("--longform",), dict(
        action="store_true",
        help="translate an endless stream sentence by sentence at bounded memory: "
             "up to --max-history finished sentence pairs stay as context, the oldest "
             "are evicted past --context-budget (docs/longform.md)")),
    "max_history": Option(("--max-history",), dict(
        type=history_size, default=0, metavar="N|all",
        help="with --longform: finished sentence pairs kept as the conversation before "
             "the sentence being read, or all that --context-budget holds (default: 0; "
             "on Qwen 0.5B every pair kept costs BLEU, docs/longform.md)")),
    "context_budget": Option(("--context-budget",), dict(
        type=positive_int, default=1024, metavar="N",
        help="with --longform: context tokens above which old sentence pairs are "
             "evicted (default: 1024)")),
    "one_turn": Option(("--one-turn",), dict(
        action="store_true",
        help="with --longform: the whole stream as one user turn and one assistant turn "
             "(default: each finished sentence pair is a turn of the conversation; in one "
             "turn a zero-shot model tends to stop after the first sentence)")),
    "eviction": Option(("--eviction",), dict(
        choices=("reprefill", "rotate"), default="reprefill",
        help="with --longform: reprefill (exact) or rotate (RoPE re-rotation: fast, "
             "approximate past the first layer) (default: reprefill)")),
}


def add_longform_options(parser: argparse.ArgumentParser) -> None:
    for option in LONGFORM_OPTIONS.values():
        option.add(parser)


def add_model_options(parser: argparse.ArgumentParser, *, many: bool = False) -> None:
    """The model options, then the decode options (``many``: several k and layouts)."""
    for option in (*MODEL_OPTIONS.values(), *DECODE_OPTIONS.values()):
        option.add(parser, many=many)


def decode_config(args, **overrides) -> DecodeConfig:
    """The DecodeConfig of the command line's decode options (``overrides`` for eval's
    runs); an invalid combination is a usage error."""
    options = {name: getattr(args, name) for name in DECODE_OPTIONS} | overrides
    try:
        return DecodeConfig(**options)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


# --- models ------------------------------------------------------------------------------


def check_adapter_option(adapter: str | None) -> None:
    """A missing or damaged --adapter (simulref.adapters.read_adapter) is a usage error
    naming it, before any model loads."""
    if adapter is None:
        return
    from simulref.adapters import AdapterError, read_adapter

    try:
        read_adapter(adapter)
    except (FileNotFoundError, AdapterError) as error:
        raise UsageError(f"--adapter {adapter}: {error}") from None


def load_model(spec: str | None, dtype: str | None = None, adapter: str | None = None):
    """(model, tokenizer) for a preset name or a path; a bad one is a usage error (an
    adapter that does not fit the model blames --adapter, not --model)."""
    from simulref import models
    from simulref.adapters import AdapterError

    name = spec or models.DEFAULT_PRESET
    check_adapter_option(adapter)  # a missing or damaged adapter costs no model load
    try:
        return models.load(name, dtype, adapter=adapter)
    except AdapterError as error:
        option = f"--adapter {adapter}" if adapter is not None else f"--model {name}"
        raise UsageError(f"{option}: {error}") from None
    except (OSError, ValueError, models.DownloadError) as error:
        raise UsageError(f"--model {name}: {error}") from None


def check_engine(config: DecodeConfig, known_source: bool) -> None:
    """Refuse, before the model loads, an --engine that cannot run this kind of source
    (the rule: refused, never swapped; docs/decoder.md, "Engines")."""
    try:
        config.check_source(known_source)
    except ValueError as error:
        raise UsageError(f"--{error}") from None


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
