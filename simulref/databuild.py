"""Training pairs from gettext message catalogs, kept apart from every test sentence.

``python -m simulref.databuild --locale-dir /usr/share/locale --out simulref/data/train``
reads the English->French and English->German PostgreSQL 15 catalogs
(``<locale-dir>/<lang>/LC_MESSAGES/*-15.mo``, Debian package ``postgresql-15``; Python's
:mod:`gettext` reads them), keeps one-line sentences of 6-30 words without format
placeholders, removes every pair whose English source is held out (below), deduplicates
by source and splits train/valid with a fixed seed. The TSVs it writes ship in the package
(``simulref/data/train/``), so training needs no Debian package at run time.

Held out: a source is excluded when its words equal those of the source of a line of the
bundled test sets (``simulref/data/*.tsv``) or of any extra TSV given with ``--exclude``,
or when the sha256 of its words joined by single spaces (or of its stripped UTF-8 text)
is listed in a ``--reserved`` file (one hex digest per line). Words are what the decoder
sees (``str.split``): two sources that differ only in whitespace are the same source to
it. Otherwise the comparison is exact (case, punctuation); no fuzzy matching.

Pure except :func:`read_catalog` and :func:`main` (no MLX).
"""

from __future__ import annotations

import argparse
import gettext
import hashlib
import random
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

LANGUAGES = ("fr", "de")
MIN_WORDS, MAX_WORDS = 6, 30
DEFAULT_SEED = 15
DEFAULT_VALID = 100  # sentences per language held out for validation loss
# printf (%s, %d, %1$s, %m, %%), Python/brace ({0}, {name}) and Qt-style (%1) placeholders.
_PLACEHOLDER = re.compile(r"%|\{[^}]*\}")
CATALOG_GLOB = "*-15.mo"  # the catalogs of Debian's postgresql-15 package


def source_hash(source: str) -> str:
    """The sha256 of the stripped source, UTF-8: what reserved-sources files list."""
    return hashlib.sha256(source.strip().encode("utf-8")).hexdigest()


def words_of(source: str) -> str:
    """The source as the decoder sees it, its words (``str.split``: any run of
    whitespace, a tab or a non-breaking space included, cuts), joined by single spaces."""
    return " ".join(source.split())


def is_sentence(source: str, target: str) -> bool:
    """A one-line message of MIN_WORDS..MAX_WORDS words, no placeholder on either side,
    and actually translated (the target is not the source copied)."""
    if not isinstance(source, str) or not isinstance(target, str):
        return False
    source, target = source.strip(), target.strip()
    if not source or not target or source == target:
        return False
    if any(c in text for text in (source, target) for c in "\n\r\t"):
        return False
    if _PLACEHOLDER.search(source) or _PLACEHOLDER.search(target):
        return False
    return MIN_WORDS <= len(source.split()) <= MAX_WORDS


@dataclass(frozen=True)
class HeldOut:
    """What must never appear as a training source."""

    sources: frozenset[str]  # test-set sources, kept as their words (:func:`words_of`)
    hashes: frozenset[str]  # sha256 of stripped sources (lower-case hex)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", frozenset(words_of(s) for s in self.sources))

    def excludes(self, source: str) -> bool:
        words = words_of(source)
        # Both hashes: a reserved list hashes the stripped text, which is the words for a
        # source written with single spaces; a respaced copy of it is caught by its words.
        return (words in self.sources or source_hash(words) in self.hashes
                or source_hash(source) in self.hashes)


def read_sources(path: str | Path) -> set[str]:
    """Stripped sources (first column) of a ``source<TAB>reference`` TSV file."""
    sources = set()
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(f"{path}:{number}: expected source<TAB>reference, got {line!r}")
        sources.add(line.split("\t", 1)[0].strip())
    return sources


def read_hashes(path: str | Path) -> set[str]:
    """Hex sha256 digests, one per line (blank lines and ``#`` comments skipped)."""
    hashes = set()
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip().lower()
        if not line:
            continue
        if not re.fullmatch(r"[0-9a-f]{64}", line):
            raise ValueError(f"{path}:{number}: expected a sha256 hex digest, got {line!r}")
        hashes.add(line)
    return hashes


def training_guard() -> HeldOut:
    """What no training data may hold: the bundled test sets and reserved sources."""
    return held_out(bundled_test_sets())


def first_held_out(pairs, held: HeldOut):
    """The first ``(line, source)`` of ``pairs`` (objects with ``.source`` and ``.line``)
    that ``held`` excludes, or None."""
    for pair in pairs:
        if held.excludes(pair.source):
            return pair.line, pair.source
    return None


def bundled_test_sets() -> list[Path]:
    """The bundled evaluation TSVs (``simulref/data/*.tsv``)."""
    return sorted((Path(__file__).parent / "data").glob("*.tsv"))


# The project's reserved English sources (a copy of the shared data's
# reserved-sources.sha256): never training data, whatever else is held out.
RESERVED = Path(__file__).parent / "data" / "reserved-sources.sha256"


def held_out(test_sets: Iterable[str | Path] = (),
             reserved: Iterable[str | Path] = ()) -> HeldOut:
    """The bundled reserved hashes (:data:`RESERVED`), ``reserved`` files and the sources
    of ``test_sets``."""
    sources: set[str] = set()
    for path in test_sets:
        sources |= read_sources(path)
    hashes: set[str] = set()
    for path in (RESERVED, *reserved):
        hashes |= read_hashes(path)
    return HeldOut(frozenset(sources), frozenset(hashes))


def read_catalog(path: str | Path) -> list[tuple[str, str]]:
    """(msgid, msgstr) of a compiled gettext catalog, singular messages only (plural
    forms are keyed by tuples and carry placeholders anyway), header entry skipped."""
    with open(path, "rb") as handle:
        catalog = gettext.GNUTranslations(handle)._catalog
    return [(k, v) for k, v in catalog.items() if isinstance(k, str) and k and
            isinstance(v, str)]


def select_pairs(catalogs: Sequence[Sequence[tuple[str, str]]],
                 held: HeldOut) -> list[tuple[str, str]]:
    """Sentences of every catalog, stripped, held-out sources removed, one pair per
    source: the first seen, catalogs in the given order, messages sorted by source (so
    the result does not depend on the catalog's hash order)."""
    seen: set[str] = set()
    pairs = []
    for catalog in catalogs:
        for source, target in sorted(catalog):
            source, target = source.strip(), target.strip()
            if not is_sentence(source, target) or source in seen or held.excludes(source):
                continue
            seen.add(source)
            pairs.append((source, target))
    return pairs


def split(pairs: Sequence[tuple[str, str]], valid: int,
          seed: int = DEFAULT_SEED) -> tuple[list, list]:
    """Shuffle with ``seed`` (order-independent: pairs are sorted first) and cut off
    ``valid`` pairs (at most half of them) for validation."""
    if isinstance(valid, bool) or not isinstance(valid, int) or valid < 0:
        raise ValueError(f"valid: expected an int >= 0, got {valid!r}")
    ordered = sorted(pairs)
    random.Random(seed).shuffle(ordered)
    cut = min(valid, len(ordered) // 2)
    return ordered[cut:], ordered[:cut]


def format_tsv(pairs: Iterable[tuple[str, str]]) -> str:
    return "".join(f"{s}\t{t}\n" for s, t in pairs)


def build(locale_dir: str | Path, languages: Sequence[str], held: HeldOut, *,
          valid: int = DEFAULT_VALID, seed: int = DEFAULT_SEED,
          pattern: str = CATALOG_GLOB) -> dict[str, tuple[list, list]]:
    """``{lang: (train, valid)}`` from ``<locale_dir>/<lang>/LC_MESSAGES/<pattern>``."""
    result = {}
    for lang in languages:
        files = sorted((Path(locale_dir) / lang / "LC_MESSAGES").glob(pattern))
        if not files:
            raise FileNotFoundError(f"--locale-dir: no {pattern} catalogs in "
                                    f"{Path(locale_dir) / lang / 'LC_MESSAGES'}")
        pairs = select_pairs([read_catalog(f) for f in files], held)
        result[lang] = split(pairs, valid, seed)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from simulref.atomic import atomic_write

    parser = argparse.ArgumentParser(prog="python -m simulref.databuild",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--locale-dir", default="/usr/share/locale",
                        help="root of the <lang>/LC_MESSAGES catalogs (default: %(default)s)")
    parser.add_argument("--out", required=True, help="directory for the TSV files")
    parser.add_argument("--lang", nargs="+", choices=LANGUAGES, default=list(LANGUAGES))
    parser.add_argument("--exclude", nargs="*", default=[], metavar="TSV",
                        help="more test sets to hold out (the bundled ones always are)")
    parser.add_argument("--reserved", nargs="*", default=[], metavar="FILE",
                        help="more files of sha256 digests of held-out sources (the "
                             "bundled reserved-sources.sha256 always is)")
    parser.add_argument("--valid", type=int, default=DEFAULT_VALID,
                        help="validation pairs per language (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        held = held_out([*bundled_test_sets(), *args.exclude], args.reserved)
        built = build(args.locale_dir, args.lang, held, valid=args.valid, seed=args.seed)
        out.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as error:
        print(f"simulref.databuild: error: {error}", file=sys.stderr)
        return 2
    for lang, (train, valid) in built.items():
        for part, pairs in (("train", train), ("valid", valid)):
            with atomic_write(out / f"postgres-en-{lang}.{part}.tsv", text=True) as handle:
                handle.write(format_tsv(pairs))
        print(f"en-{lang}: {len(train)} train, {len(valid)} valid pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
