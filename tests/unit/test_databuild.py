"""The training-data builder: sentence filter, held-out sources, dedup, split, shipped TSVs.

CI has no Debian postgresql package, so the catalog tests write their own small ``.mo``
files; the shipped TSVs are checked against the bundled test sets and the reserved
hashes (copied into tests/unit/data)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulref import databuild
from simulref.databuild import HeldOut, is_sentence, select_pairs, source_hash, split

DATA = Path(__file__).parent / "data"
SHIPPED = Path(databuild.__file__).parent / "data" / "train"


def write_mo(path: Path, messages: dict[str, str]) -> Path:
    """A GNU .mo file (little-endian, no hash table) with a header entry, as msgfmt writes."""
    entries = {"": "Content-Type: text/plain; charset=UTF-8\n", **messages}
    keys = sorted(entries)
    ids = [k.encode() for k in keys]
    strs = [entries[k].encode() for k in keys]
    n = len(keys)
    table_start = 7 * 4
    data_start = table_start + 2 * n * 8
    blob, id_table, str_table = b"", [], []
    for raw, table in [(i, id_table) for i in ids] + [(s, str_table) for s in strs]:
        table.append((len(raw), data_start + len(blob)))
        blob += raw + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, n, table_start, table_start + n * 8, 0, 0)
    body = b"".join(struct.pack("<2I", *e) for e in id_table + str_table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + body + blob)
    return path


SENTENCE = "the server closed the connection unexpectedly today"
MESSAGES = {
    SENTENCE: "le serveur a fermé la connexion de manière inattendue",
    "could not open file for reading right now": "n'a pas pu ouvrir le fichier en lecture",
    "could not open file %s for reading now": "n'a pas pu ouvrir le fichier %s en lecture",
    "too short": "trop court",
    "Two\nlines of text that are long enough": "Deux\nlignes de texte assez longues",
    "this message is not translated at all here": "this message is not translated at all here",
    "the test set holds this very sentence here": "le jeu de test contient cette phrase",
    "the reserved list holds this one sentence": "la liste réservée contient celle-ci",
}


def test_read_catalog_and_build_exclude_held_out_sources(tmp_path):
    write_mo(tmp_path / "fr/LC_MESSAGES/postgres-15.mo", MESSAGES)
    # A second catalog repeating a source: kept once (from the first catalog by name).
    write_mo(tmp_path / "fr/LC_MESSAGES/zz-15.mo", {SENTENCE: "une autre traduction ici"})
    write_mo(tmp_path / "fr/LC_MESSAGES/other-14.mo", {"not a catalog of the 15 package "
                                                      "at all": "pas du tout"})
    test_set = tmp_path / "test.tsv"
    test_set.write_text("  the test set holds this very sentence here \tx\n", encoding="utf-8")
    reserved = tmp_path / "reserved.sha256"
    reserved.write_text(source_hash("the reserved list holds this one sentence") + "\n")

    assert dict(databuild.read_catalog(tmp_path / "fr/LC_MESSAGES/postgres-15.mo")) == MESSAGES
    held = databuild.held_out([test_set], [reserved])
    train, valid = databuild.build(tmp_path, ["fr"], held, valid=0)["fr"]
    assert valid == []
    assert sorted(train) == sorted([
        (SENTENCE, MESSAGES[SENTENCE]),
        ("could not open file for reading right now", "n'a pas pu ouvrir le fichier en lecture"),
    ])

    # Without the held-out lists both sentences come back: the exclusion did the work.
    train, _ = databuild.build(tmp_path, ["fr"], HeldOut(frozenset(), frozenset()), valid=0)["fr"]
    assert len(train) == 4


def test_main_writes_the_tsvs(tmp_path, capsys):
    write_mo(tmp_path / "loc/fr/LC_MESSAGES/postgres-15.mo", MESSAGES)
    reserved = tmp_path / "reserved.sha256"
    reserved.write_text(source_hash(SENTENCE) + "\n")
    out = tmp_path / "out"
    assert databuild.main(["--locale-dir", str(tmp_path / "loc"), "--out", str(out),
                           "--lang", "fr", "--valid", "1", "--reserved", str(reserved)]) == 0
    rows = [line.split("\t") for part in ("train", "valid")
            for line in (out / f"postgres-en-fr.{part}.tsv").read_text().splitlines()]
    assert len(rows) == 3 and SENTENCE not in {r[0] for r in rows}
    assert "en-fr: 2 train, 1 valid pairs" in capsys.readouterr().out


def test_main_reports_missing_catalogs(tmp_path, capsys):
    assert databuild.main(["--locale-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--locale-dir: no *-15.mo catalogs" in capsys.readouterr().err


words = st.text(alphabet="abcdefgh", min_size=1, max_size=6)
sources = st.lists(words, min_size=6, max_size=12).map(" ".join)


@given(st.lists(st.tuples(sources, sources), max_size=30), st.data())
def test_selected_pairs_are_unique_and_never_held_out(pairs, data):
    all_sources = sorted({s for s, _ in pairs})
    by_text = data.draw(st.lists(st.sampled_from(all_sources), unique=True)) if all_sources else []
    by_hash = data.draw(st.lists(st.sampled_from(all_sources), unique=True)) if all_sources else []
    held = HeldOut(frozenset(by_text), frozenset(source_hash(s) for s in by_hash))
    # Held-out sources may arrive padded with whitespace: they are compared stripped.
    catalogs = [[(f"  {s}\n" if i % 2 else s, t) for i, (s, t) in enumerate(pairs)]]
    selected = select_pairs(catalogs, held)
    chosen = [s for s, _ in selected]
    assert len(chosen) == len(set(chosen))
    assert not set(chosen) & (set(by_text) | set(by_hash))
    expected = {s for s, t in pairs if is_sentence(s, t)} - set(by_text) - set(by_hash)
    assert set(chosen) == expected


@given(st.lists(st.tuples(words, words), unique=True, max_size=40),
       st.integers(0, 50), st.integers(0, 3))
def test_split_is_a_seeded_partition(pairs, valid, seed):
    train, held = split(pairs, valid, seed)
    assert sorted(train + held) == sorted(pairs)
    assert len(held) == min(valid, len(pairs) // 2)
    assert split(list(reversed(pairs)), valid, seed) == (train, held)


@pytest.mark.parametrize("source, target, ok", [
    ("one two three four five six", "un deux trois quatre cinq six", True),
    ("one two three four five", "un deux trois quatre cinq", False),
    (" ".join(["w"] * 31), "x y", False),
    ("one two three four five %s", "un deux trois quatre cinq %s", False),
    ("one two three four five six", "un deux {0} quatre cinq six", False),
    ("one two three four five six", "", False),
    ("one two\tthree four five six", "un deux trois quatre cinq six", False),
])
def test_is_sentence(source, target, ok):
    assert is_sentence(source, target) is ok


def shipped_pairs():
    files = sorted(SHIPPED.glob("*.tsv"))
    assert len(files) == 4
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            source, target = line.split("\t")
            yield path.name, source, target


def test_shipped_tsvs_hold_no_test_or_reserved_source():
    test_sources = set()
    for path in databuild.bundled_test_sets():
        test_sources |= databuild.read_sources(path)
    assert len(test_sources) == 200
    reserved = databuild.read_hashes(DATA / "reserved-sources.sha256")
    assert len(reserved) == 200
    seen: dict[str, set] = {}
    for name, source, target in shipped_pairs():
        assert source == source.strip() and is_sentence(source, target), (name, source)
        assert source not in test_sources, (name, source)
        assert source_hash(source) not in reserved, (name, source)
        language = name.split(".")[0]
        assert source not in seen.setdefault(language, set()), (name, source)  # no duplicates
        seen[language].add(source)
    assert {k: len(v) for k, v in seen.items()} == {"postgres-en-de": 2023, "postgres-en-fr": 1693}


def test_the_reserved_sources_are_always_held_out(tmp_path, monkeypatch):
    """The packaged reserved list is the shared one (tests/unit/data holds a copy of
    ../shared/data/reserved-sources.sha256), and the builder holds it out without being
    told: main without --reserved drops a sentence whose hash it lists."""
    assert databuild.RESERVED.read_bytes() == (DATA / "reserved-sources.sha256").read_bytes()
    assert len(databuild.held_out().hashes) == 200
    reserved = tmp_path / "reserved.sha256"
    reserved.write_text(databuild.RESERVED.read_text() + source_hash(SENTENCE) + "\n")
    monkeypatch.setattr(databuild, "RESERVED", reserved)
    write_mo(tmp_path / "loc/fr/LC_MESSAGES/postgres-15.mo", MESSAGES)
    out = tmp_path / "out"
    assert databuild.main(["--locale-dir", str(tmp_path / "loc"), "--out", str(out),
                           "--lang", "fr", "--valid", "0"]) == 0
    sources = {line.split("\t")[0]
               for line in (out / "postgres-en-fr.train.tsv").read_text().splitlines()}
    assert SENTENCE not in sources and sources
    assert databuild.training_guard().excludes(SENTENCE)


def test_held_out_compares_the_words_the_decoder_sees(tmp_path):
    """Issue 21, item 8: a test source with a doubled internal space (or a tab, or a
    non-breaking space: str.split splits them all) is the same source to the decoder,
    so it is held out too, whether the test set or a reserved hash lists it."""
    test_set = tmp_path / "test.tsv"
    test_set.write_text("The server closed the connection unexpectedly\tLe serveur\n")
    reserved = tmp_path / "reserved.sha256"
    reserved.write_text(source_hash("could not open the file for reading") + "\n")
    held = databuild.held_out([test_set], [reserved])
    for source in ("The server  closed the connection unexpectedly",
                   " The server closed\tthe connection unexpectedly ",
                   "The server\u00a0closed the connection unexpectedly",
                   "could  not open the file for reading",
                   "could not open the file\tfor reading"):
        assert held.excludes(source), source
    assert not held.excludes("The server closed the connection")


def test_a_test_set_source_written_with_odd_spacing_is_held_out_as_its_words(tmp_path):
    test_set = tmp_path / "test.tsv"
    test_set.write_text("The server  closed   the connection\tLe serveur\n")
    assert databuild.held_out([test_set]).excludes("The server closed the connection")


def test_no_shipped_source_is_held_out_even_by_its_words():
    guard = databuild.training_guard()
    assert not [(name, s) for name, s, _ in shipped_pairs() if guard.excludes(s)]
