"""Shared fixtures for the unit tests: small, generic, built in milliseconds."""

from __future__ import annotations

import copy

import pytest

from simulref.testing import tiny_tokenizer


def retemplated(tokenizer, chat_template, *, special_tokens=(), bos_token=None):
    """A copy of ``tokenizer`` (mlx-lm ``TokenizerWrapper``) with another chat template,
    extra special tokens and optionally a BOS token; the original is left untouched."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    hf = copy.deepcopy(tokenizer._tokenizer)
    if special_tokens:
        hf.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    if bos_token is not None:
        hf.add_special_tokens({"bos_token": bos_token})
    hf.chat_template = chat_template
    return TokenizerWrapper(hf)


@pytest.fixture(scope="session")
def tiny_tok():
    """The tiny ChatML byte-level BPE tokenizer (a ``TokenizerWrapper``)."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def retemplate():
    """``retemplate(tokenizer, chat_template, special_tokens=(), bos_token=None)``."""
    return retemplated


# --- the training command line's data (test_train_cli.py, test_cli_reliability.py) ---

TSV = ("The weather is nice today\tIl fait beau aujourd'hui\n"
       "I want to buy a car\tJe veux acheter une voiture\n"
       "The quick brown fox jumps\tLe renard brun saute\n"
       "The old dog sleeps under the table\tLe vieux chien dort sous la table\n")


@pytest.fixture
def data(tmp_path):
    """Four source<TAB>reference pairs in a TSV file (its path)."""
    path = tmp_path / "pairs.en-fr.tsv"
    path.write_text(TSV, encoding="utf-8")
    return str(path)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the options must be checked before one."""
    from simulref import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(models, "load", refuse)
