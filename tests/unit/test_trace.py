"""Trace: events, derived properties, JSON Lines round trip, schema, rendering."""

from __future__ import annotations

import dataclasses
import json
import math
from importlib import resources

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulref.trace import (
    FINISH_REASONS,
    OLDER_SCHEMAS,
    SCHEMA_VERSION,
    BlankRun,
    DroppedEos,
    Finish,
    Hypothesis,
    Look,
    Read,
    Settings,
    SourceEnd,
    Trace,
    Write,
    read_traces,
    render_compact,
    write_traces,
)

# ------------------------------------------------------------------ strategies

# Words with the characters that break naive JSON Lines handling: quotes, backslashes,
# newlines, and the separators str.splitlines() honours (U+0085, U+2028, U+2029).
tricky = st.sampled_from(['"', "\\", "\n", "\r", "\t", "\x85", "\u2028", "\u2029", "é", "🙂"])
words = st.one_of(st.text(max_size=8), st.lists(tricky, max_size=4).map("".join))
times = st.floats(allow_nan=False, allow_infinity=False)  # incl. huge, tiny, subnormal, -0.0
token_ids = st.lists(st.integers(min_value=0, max_value=2**40), max_size=5).map(tuple)
index = st.integers(min_value=0, max_value=10**6)

events = st.one_of(
    st.builds(Read, index, words, token_ids, times),
    st.builds(Write, index, words, token_ids, times),
    st.builds(DroppedEos, index, times),
    st.builds(BlankRun, index, token_ids, times),
    st.builds(SourceEnd, index, token_ids, times),
    token_ids.filter(bool).flatmap(lambda ids: st.builds(
        Look, index, st.just(ids), st.lists(st.floats(0.0, 1.0), min_size=len(ids),
                                            max_size=len(ids)), times)),
    st.builds(Hypothesis, index, token_ids, times),
    st.builds(Finish, st.sampled_from(FINISH_REASONS), times),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
)
FIELDS = {f.name for f in dataclasses.fields(Settings)}
settings = st.builds(
    Settings,
    model=st.text(max_size=10),
    k=st.none() | st.integers(min_value=0, max_value=20),
    layout=st.text(min_size=1, max_size=10),
    system=words,
    target_start=st.just("auto") | st.integers(min_value=0, max_value=500),
    max_tokens_per_word=st.none() | st.integers(min_value=1, max_value=100),
    max_new_words=st.none() | st.integers(min_value=0, max_value=100),
    stop_at_first_eos=st.booleans(),
    extra=st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda s: s not in FIELDS),
                          scalars, max_size=3),
)
traces = st.builds(Trace, settings, st.lists(words, max_size=6).map(tuple),
                   st.lists(events, max_size=12).map(tuple))


def settings_example(**kw) -> Settings:
    base = dict(model="smollm2-135m", k=2, layout="group", system="Translate to French")
    return Settings(**(base | kw))


EXAMPLE = Trace(
    settings_example(),
    ("The", "quick", "brown", "fox"),
    (
        Read(0, "The", (504,), 0.5),
        Read(1, "quick", (2365,), 0.75),
        Write(0, " Le", (1009,), 1.0),
        Read(2, "brown", (6354,), 1.25),
        DroppedEos(2, 1.5),
        Write(1, " renard", (12, 13), 2.0),
        Read(3, "fox", (11437, 2), 2.25),
        Write(2, " brun", (9,), 2.5),
        Write(3, ".", (30,), 2.75),
        Finish("eos", 3.0),
    ),
)


# ------------------------------------------------------------------ derived properties


def test_derived_properties_of_the_example():
    assert EXAMPLE.delays == (2, 3, 4, 4)
    assert EXAMPLE.target_words == ("Le", "renard", "brun", ".")
    assert EXAMPLE.target_text == "Le renard brun."
    assert EXAMPLE.finish_reason == "eos"


def test_finish_reason_is_none_without_finish_and_the_last_one_otherwise():
    assert Trace(settings_example(), ("a",), (Read(0, "a", (1,)),)).finish_reason is None
    two = Trace(settings_example(), (), (Finish("early_eos"), Finish("cancelled")))
    assert two.finish_reason == "cancelled"


@given(st.lists(events, max_size=20))
def test_delays_count_the_reads_before_each_write(evs):
    trace = Trace(settings_example(), (), tuple(evs))
    slow = [sum(isinstance(x, Read) for x in evs[:pos])
            for pos, e in enumerate(evs) if isinstance(e, Write)]
    assert list(trace.delays) == slow
    assert len(trace.target_words) == len(trace.delays)
    assert trace.target_text == "".join(e.text for e in evs if isinstance(e, Write)).strip()


# ------------------------------------------------------------------ JSON Lines round trip


@given(traces)
def test_jsonl_round_trip_is_exact(trace):
    text = trace.to_jsonl()
    back = Trace.from_jsonl(text)
    assert back == trace
    # Exact floats, not just equal-ish (-0.0 keeps its sign too).
    for a, b in zip(back.events, trace.events, strict=True):
        assert math.copysign(1.0, a.t) == math.copysign(1.0, b.t) and a.t == b.t


@given(traces)
def test_jsonl_without_times_reads_back_with_times_zeroed(trace):
    text = trace.to_jsonl(times=False)
    for line in text.split("\n")[1:]:
        if line:
            assert "t" not in json.loads(line)
    assert Trace.from_jsonl(text) == trace.without_times()
    assert all(e.t == 0.0 for e in trace.without_times().events)


@given(traces)
def test_one_record_per_line_with_sorted_keys(trace):
    text = trace.to_jsonl()
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    assert len(lines) == 1 + len(trace.events)
    records = [json.loads(line) for line in lines]
    for r in records:
        assert list(r) == sorted(r)
    observing = any(isinstance(e, (Look, Hypothesis)) for e in trace.events)
    # The oldest version that holds the records: count-only traces stay /3.
    assert records[0]["record"] == "trace" and records[0]["schema"] == (
        SCHEMA_VERSION if observing else "simulref.trace/3")
    assert records[0]["delays"] == list(trace.delays)
    assert records[0]["target_words"] == list(trace.target_words)
    assert records[0]["finish_reason"] == trace.finish_reason


@given(st.lists(traces, max_size=3))
def test_several_traces_in_one_text(many):
    text = "".join(t.to_jsonl() for t in many)
    assert read_traces(text) == many


def test_write_and_read_a_file(tmp_path):
    other = Trace(settings_example(k=None, extra={"policy": "read-all"}), ("x",), ())
    path = tmp_path / "traces.jsonl"
    write_traces(path, [EXAMPLE, other])
    assert read_traces(path) == [EXAMPLE, other]
    assert read_traces(str(path)) == [EXAMPLE, other]
    assert [p.name for p in tmp_path.iterdir()] == ["traces.jsonl"]
    write_traces(path, [EXAMPLE], times=False)
    assert read_traces(path) == [EXAMPLE.without_times()]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "traces.jsonl"
    write_traces(path, [EXAMPLE])
    before = path.read_bytes()
    # A lone surrogate is a valid Python str but cannot be encoded as UTF-8.
    broken = Trace(settings_example(), ("\ud800",), ())
    with pytest.raises(UnicodeEncodeError):
        write_traces(path, [EXAMPLE, broken])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["traces.jsonl"]


def test_windows_line_endings_and_blank_lines_are_accepted():
    text = EXAMPLE.to_jsonl().replace("\n", "\r\n") + "\r\n\n"
    assert read_traces(text) == [EXAMPLE]


def test_the_format_is_pinned():
    # A change here is a change of the file format: bump SCHEMA_VERSION and the docs.
    small = Trace(settings_example(extra={"sampler": "greedy"}), ("Hi", "there"),
                  (Read(0, "Hi", (1,), 0.25), Write(0, " Salut", (7,), 0.5),
                   Read(1, "there", (2, 3)), Finish("eos")))
    assert small.to_jsonl(times=False) == (
        '{"delays": [1], "finish_reason": "eos", "record": "trace", '
        '"schema": "simulref.trace/3", "settings": {"extra": {"sampler": "greedy"}, "k": 2, '
        '"layout": "group", "max_new_words": null, "max_tokens_per_word": 50, '
        '"model": "smollm2-135m", "stop_at_first_eos": false, "system": "Translate to French", '
        '"target_start": "auto"}, "source_words": ["Hi", "there"], "target_words": ["Salut"]}\n'
        '{"record": "read", "source_index": 0, "token_ids": [1], "word": "Hi"}\n'
        '{"record": "write", "target_index": 0, "text": " Salut", "token_ids": [7]}\n'
        '{"record": "read", "source_index": 1, "token_ids": [2, 3], "word": "there"}\n'
        '{"reason": "eos", "record": "finish"}\n'
    )
    assert '"t": 0.25' in small.to_jsonl().split("\n")[1]


# ------------------------------------------------------------------ malformed input


def _lines() -> list[str]:
    return EXAMPLE.to_jsonl().split("\n")[:-1]


def _edit(line_no: int, **changes) -> str:
    lines = _lines()
    record = json.loads(lines[line_no - 1])
    for key, value in changes.items():
        if value is _DROP:
            del record[key]
        else:
            record[key] = value
    lines[line_no - 1] = json.dumps(record)
    return "\n".join(lines)


_DROP = object()


def test_schema_1_files_still_read():
    (trace,) = read_traces(_edit(1, schema="simulref.trace/1"))
    assert trace == EXAMPLE


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        ("\n".join(_lines()[:2] + ["{oops"] + _lines()[3:]), 3, "invalid JSON"),
        ("\n".join(_lines()[:2] + ["[1, 2]"] + _lines()[3:]), 3, "expected a JSON object"),
        ("\n".join(_lines()[1:]), 1, "'trace' header record first"),
        (_edit(2, record="reed"), 2, "expected 'record' to be one of"),
        (_edit(1, schema="simulref.trace/5"), 1, "unsupported schema"),
        (_edit(1, delays=[2, 3, 4, 5]), 1, "header delays"),
        (_edit(1, target_words=["Le"]), 1, "header target_words"),
        (_edit(1, finish_reason=None), 1, "header finish_reason"),
        (_edit(1, source_words=_DROP), 1, "missing ['source_words']"),
        (_edit(1, colour="red"), 1, "unexpected key(s) ['colour']"),
        (_edit(1, settings={"model": "m"}), 1, "settings is missing"),
        (_edit(1, settings={"model": "m", "k": 1, "layout": "g", "system": "", "kk": 1}), 1,
         "unknown settings key"),
        (_edit(1, source_words="The quick"), 1, "source_words"),
        (_edit(2, source_index="0"), 2, "source_index: expected an int >= 0"),
        (_edit(2, source_index=True), 2, "source_index: expected an int >= 0"),
        (_edit(2, token_ids=5), 2, "token_ids"),
        (_edit(2, token_ids=[1, -2]), 2, "token_ids"),
        (_edit(2, word=_DROP), 2, "missing ['word']"),
        (_edit(2, colour="red"), 2, "unexpected key(s) ['colour']"),
        (_edit(3, t="soon"), 3, "t must be a float"),
        (_edit(11, reason="tired"), 11, "Finish.reason must be one of"),
        ("\n".join(_edit(1, schema="simulref.trace/1").split("\n")[:6]
                   + ['{"record": "blank_run", "source_index": 2, "token_ids": [9]}']),
         7, "'blank_run' records do not exist in schema 'simulref.trace/1'"),
    ],
)
def test_malformed_input_names_the_line_and_what_was_expected(text, line, expected):
    with pytest.raises(ValueError) as info:
        read_traces(text)
    message = str(info.value)
    assert message.startswith(f"line {line}:"), message
    assert expected in message, message


def test_non_finite_time_in_a_file_is_rejected():
    text = EXAMPLE.to_jsonl().replace('"t": 1.0', '"t": NaN')
    with pytest.raises(ValueError, match=r"line 4: .*finite"):
        read_traces(text)


def test_from_jsonl_wants_exactly_one_trace():
    with pytest.raises(ValueError, match="exactly one trace, found 2"):
        Trace.from_jsonl(EXAMPLE.to_jsonl() * 2)
    with pytest.raises(ValueError, match="exactly one trace, found 0"):
        Trace.from_jsonl("")
    with pytest.raises(TypeError, match="JSON Lines text"):
        Trace.from_jsonl(b"{}")  # type: ignore[arg-type]


# ------------------------------------------------------------------ construction checks


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Read(-1, "a", (1,)), ValueError, "source_index: expected an int >= 0, got -1"),
        (lambda: Read(0, "a", "12"), TypeError, "token_ids"),
        (lambda: Read(0, 5, (1,)), TypeError, "Read.word must be a str"),
        (lambda: Write(True, "a", (1,)), TypeError, "target_index: expected an int >= 0, got True"),
        (lambda: Write(0, "a", (1,), float("nan")), ValueError, "finite"),
        (lambda: Finish("done"), ValueError, "Finish.reason must be one of"),
        (lambda: DroppedEos(0, "1"), TypeError, "DroppedEos.t"),
        (lambda: BlankRun(-2, (1,)), ValueError, "BlankRun.source_index"),
        (lambda: BlankRun(0, [1.5]), TypeError, "BlankRun.token_ids"),
        (lambda: settings_example(target_start="soon"), ValueError, "target_start"),
        (lambda: settings_example(target_start=-1), ValueError, "target_start"),
        (lambda: settings_example(k=1.5), TypeError, "Settings.k"),
        (lambda: settings_example(layout=""), ValueError, "layout"),
        (lambda: settings_example(max_tokens_per_word=0), ValueError, "max_tokens_per_word"),
        (lambda: settings_example(stop_at_first_eos=1), TypeError, "stop_at_first_eos"),
        (lambda: settings_example(extra={"k": 1}), ValueError, "shadows"),
        (lambda: settings_example(extra={"x": [1]}), TypeError, "JSON scalar"),
        (lambda: settings_example(extra={"x": math.inf}), ValueError, "finite"),
        (lambda: Trace(settings_example(), "The quick", ()), TypeError, "source_words"),
        (lambda: Trace(settings_example(), (), ("read",)), TypeError, "Trace.events"),
        (lambda: Trace({"model": "m"}, (), ()), TypeError, "Trace.settings"),
    ],
)
def test_bad_construction_raises_a_clear_error(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_lists_become_tuples_and_settings_compare_by_content():
    assert Read(0, "a", [1, 2]) == Read(0, "a", (1, 2))
    a = settings_example(extra={"b": 1, "a": "x"})
    b = settings_example(extra={"a": "x", "b": 1})
    assert a == b and hash(a) == hash(b)
    assert a.option("a") == "x" and a.option("missing", 3) == 3
    t = Trace(a, ["x"], [Read(0, "x", [1])])
    assert t.source_words == ("x",) and isinstance(t.events, tuple)


# ------------------------------------------------------------------ JSON Schema


def _schema() -> dict:
    text = resources.files("simulref").joinpath("schema/trace.schema.json").read_text("utf-8")
    return json.loads(text)


_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _valid(value, schema: dict, root: dict) -> bool:
    """The subset of JSON Schema the trace schema uses; a plain reading of the spec."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return _valid(value, root["$defs"][name], root)
    if "oneOf" in schema and sum(_valid(value, s, root) for s in schema["oneOf"]) != 1:
        return False
    if "const" in schema and not (value == schema["const"] and type(value) is type(
            schema["const"])):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[k](value) for k in kinds):
            return False
    if "minimum" in schema and _TYPES["number"](value) and value < schema["minimum"]:
        return False
    if "minLength" in schema and isinstance(value, str) and len(value) < schema["minLength"]:
        return False
    if isinstance(value, list) and "items" in schema:
        return all(_valid(v, schema["items"], root) for v in value)
    if isinstance(value, dict):
        if any(k not in value for k in schema.get("required", [])):
            return False
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                if not _valid(v, props[k], root):
                    return False
            elif extra is False or (isinstance(extra, dict) and not _valid(v, extra, root)):
                return False
    return True


def test_schema_names_the_version_the_code_writes():
    schema = _schema()
    versions = schema["$defs"]["header"]["properties"]["schema"]["enum"]
    assert versions == [SCHEMA_VERSION, *OLDER_SCHEMAS]
    assert schema["$defs"]["finish_reason"]["enum"] == list(FINISH_REASONS)


@given(traces, st.booleans())
def test_every_record_written_matches_the_schema(trace, with_times):
    schema = _schema()
    for line in trace.to_jsonl(times=with_times).split("\n")[:-1]:
        record = json.loads(line)
        assert _valid(record, schema, schema), record


@pytest.mark.parametrize(
    ("line", "change"),
    [(1, {"schema": "simulref.trace/5"}), (1, {"delays": [-1]}), (2, {"word": 3}),
     (2, {"colour": "red"}), (3, {"token_ids": [1.5]}), (11, {"reason": "tired"}),
     (1, {"settings": {"model": "m", "k": 1, "layout": "", "system": ""}})],
)
def test_the_schema_rejects_what_the_reader_rejects(line, change):
    schema = _schema()
    record = json.loads(_lines()[line - 1]) | change
    assert not _valid(record, schema, schema)
    with pytest.raises(ValueError, match=f"line {line}:"):
        read_traces(_edit(line, **change))


# ------------------------------------------------------------------ rendering


def test_render_compact():
    assert render_compact(EXAMPLE) == (
        "R The  R quick  W Le  R brown  E  W renard  R fox  W brun  W .  F:eos"
    )
    odd = Trace(settings_example(), ("a b",), (Read(0, "a b", (1,)), Write(0, "\n", (2,))))
    assert render_compact(odd) == 'R "a b"  W ""'
    blank = Trace(settings_example(), ("a", "b"),
                  (Read(0, "a", (1,)), BlankRun(0, (3, 3)), Read(1, "b", (2,))))
    assert render_compact(blank) == "R a  B  R b"
    ended = Trace(settings_example(), ("a",), (Read(0, "a", (1,)), SourceEnd(1, (4, 5)),
                                               Finish("eos")))
    assert render_compact(ended) == "R a  R$  F:eos"


def test_a_source_end_round_trips_and_older_schemas_lack_it():
    ended = Trace(settings_example(), ("a",), (Read(0, "a", (1,), 0.1),
                                               SourceEnd(1, (4, 5), 0.2), Finish("eos", 0.3)))
    assert read_traces(ended.to_jsonl()) == [ended]
    older = ended.to_jsonl().replace("simulref.trace/3", "simulref.trace/2")
    with pytest.raises(ValueError, match="'source_end' records do not exist in schema "
                                         "'simulref.trace/2'"):
        read_traces(older)


def test_looks_and_hypotheses_round_trip_as_schema_4_and_older_schemas_lack_them():
    observed = Trace(settings_example(), ("a", "b"), (
        Read(0, "a", (1,), 0.1), Look(1, (7,), (0.25,), 0.2), Read(1, "b", (2,), 0.3),
        Hypothesis(2, (7, 8), 0.4), Write(0, " x", (7, 8), 0.5), Finish("eos", 0.6)))
    text = observed.to_jsonl()
    assert json.loads(text.split("\n")[0])["schema"] == "simulref.trace/4"
    assert read_traces(text) == [observed]
    assert render_compact(observed) == "R a  L 0.25  R b  H 2  W x  F:eos"
    for older in OLDER_SCHEMAS:
        with pytest.raises(ValueError, match=f"'look' records do not exist in schema "
                                             f"'{older}'"):
            read_traces(text.replace("simulref.trace/4", older))


@pytest.mark.parametrize("probs", [(), (0.5, 0.5), (1.5,), (-0.1,), (True,)])
def test_a_look_needs_one_probability_per_token(probs):
    with pytest.raises((TypeError, ValueError), match="Look.probs"):
        Look(0, (3,), probs)
