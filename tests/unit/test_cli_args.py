"""The shared options of the command line (simulref/cli/args.py): each declared once, and
mapped to DecodeConfig in one place."""

from __future__ import annotations

import dataclasses

import pytest

from simulref.cli import args as cli_args
from simulref.cli import build_parser
from simulref.config import DecodeConfig
from simulref.prompt import DEFAULT_SYSTEM

DECODING = ("translate", "watch", "eval")


def test_every_decode_option_sets_the_decode_config_field_of_its_name():
    fields = {f.name for f in dataclasses.fields(DecodeConfig)}
    assert set(cli_args.DECODE_OPTIONS) <= fields
    for command in DECODING:
        args = build_parser().parse_args([command, "x"] if command != "eval" else [command])
        for name in cli_args.DECODE_OPTIONS:
            assert hasattr(args, name), (command, name)


def test_the_defaults_are_decode_configs_defaults():
    args = build_parser().parse_args(["translate", "Hello."])
    args.system = DEFAULT_SYSTEM  # what main() fills in for translate and watch
    assert cli_args.decode_config(args) == DecodeConfig()


@pytest.mark.parametrize("command", DECODING)
def test_a_new_decode_option_is_one_declaration(monkeypatch, command):
    """Declaring an option in DECODE_OPTIONS puts it on every decoding subcommand and
    into the DecodeConfig the command line builds, with nothing else to change."""
    new = cli_args.Option(("--max-new-words",), dict(type=cli_args.positive_int, default=None))
    monkeypatch.setitem(cli_args.DECODE_OPTIONS, "max_new_words", new)
    line = [command, "--max-new-words", "4"] + (["x"] if command != "eval" else [])
    args = build_parser().parse_args(line)
    args.system = DEFAULT_SYSTEM
    overrides = {"k": 3, "layout": "group"} if command == "eval" else {}
    assert cli_args.decode_config(args, **overrides).max_new_words == 4


def test_train_shares_the_model_and_target_start_declarations():
    args = build_parser().parse_args(["train", "--out", "d", "--dtype", "float32",
                                      "--target-start", "7", "-k", "1", "3"])
    assert (args.dtype, args.target_start, args.k) == ("float32", 7, [1, 3])


def test_an_invalid_combination_is_a_usage_error():
    args = build_parser().parse_args(["translate", "x", "--layout", "interleaved",
                                      "--engine", "prefilled"])
    args.system = DEFAULT_SYSTEM
    with pytest.raises(cli_args.UsageError):
        cli_args.decode_config(args)
