"""simulref.evaluate: TSV reading, resumable progress files, scores, and a full run over a
tiny model (real decoder, real metrics)."""

from __future__ import annotations

import json
import math

import pytest
import sacrebleu
from hypothesis import given
from hypothesis import strategies as st
from traces import untimed

from simulref import evaluate, metrics
from simulref.config import DecodeConfig
from simulref.evaluate import (
    DataError,
    Evaluation,
    Pair,
    RunSpec,
    append_record,
    check_out_dir,
    default_system,
    load_records,
    parse_pairs,
    read_pairs,
    run_specs,
    summarize,
    write_atomic,
)
from simulref.trace import BlankRun, Finish, Read, Settings, Trace, Write, read_traces

field = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\t"),
    min_size=1, max_size=20,
).filter(lambda s: s.strip() == s and s.strip())


@given(st.lists(st.tuples(field, field), min_size=1, max_size=10), st.booleans(),
       st.booleans())
def test_parse_pairs_round_trip(rows, final_newline, crlf):
    eol = "\r\n" if crlf else "\n"
    text = eol.join(f"{s}\t{r}" for s, r in rows) + (eol if final_newline else "")
    pairs = parse_pairs(text)
    assert [(p.source, p.reference) for p in pairs] == rows
    assert [p.line for p in pairs] == list(range(1, len(rows) + 1))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a\tb\nno tab here\nc\td\n", "DATA:2: expected 'source<TAB>reference'"),
        ("a\tb\nc\td\te\n", "DATA:2: expected 'source<TAB>reference' (2 tab-separated "
                            "fields), found 3"),
        ("a\tb\n\nc\td\n", "DATA:2: expected"),
        ("a\tb\n \tr\n", "DATA:2: empty source"),
        ("a\t \n", "DATA:1: empty reference"),
        ("", "DATA: no sentence pairs"),
    ],
)
def test_parse_pairs_errors_name_the_line(text, message):
    with pytest.raises(DataError) as error:
        parse_pairs(text)
    assert str(error.value).startswith(message)


def test_read_pairs_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.tsv: cannot read"):
        read_pairs(tmp_path / "missing.tsv")
    with pytest.raises(DataError, match="cannot read"):
        read_pairs(tmp_path)
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("a\tb\nc\té\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.tsv:2: not UTF-8"):
        read_pairs(bad)


def test_bundled_datasets_have_200_pairs_with_the_same_sources():
    fr = read_pairs(evaluate.dataset_path("postgres-en-fr"))
    de = read_pairs(evaluate.dataset_path("postgres-en-de"))
    assert len(fr) == len(de) == 200
    assert [p.source for p in fr] == [p.source for p in de]
    with pytest.raises(DataError, match="dataset: expected one of"):
        evaluate.dataset_path("wmt14")


@pytest.mark.parametrize(
    ("dataset", "data", "language"),
    [
        ("postgres-en-fr", None, "French"),
        ("postgres-en-de", "whatever.en-fr.tsv", "German"),
        (None, "dev.en-de.tsv", "German"),
        (None, "/x/news_en_fr.tsv", "French"),
        (None, "mydata.tsv", "French"),
        (None, "open-deck.tsv", "French"),  # "en-de" must be a language pair, not in a word
    ],
)
def test_default_system_follows_the_target_language(dataset, data, language):
    expected = f"Translate the following English paragraph to {language}"
    assert default_system(dataset, data) == expected


def test_run_specs_order_and_file_names():
    specs = run_specs(["group", "interleaved", "group"], [3, 1, 3])
    assert [s.name for s in specs] == [
        "group-k3", "group-k1", "interleaved-k3", "interleaved-k1", "offline"]
    assert specs[0].traces_file == "traces-group-k3.jsonl"
    assert specs[-1].offline and specs[-1].layout == "group"
    assert specs[-1].traces_file == "traces-offline.jsonl"
    assert run_specs(["group"], [1], offline=False) == [RunSpec("group", 1)]


records_st = st.lists(
    st.fixed_dictionaries({"index": st.integers(0, 1000), "text": st.text(max_size=30),
                           "x": st.floats(allow_nan=False, allow_infinity=False)}),
    max_size=8,
)


@given(records=records_st, data=st.data())
def test_an_interrupted_append_loses_at_most_the_last_record(tmp_path_factory, records, data):
    path = tmp_path_factory.mktemp("progress") / "run.jsonl"
    for record in records:
        append_record(path, record)
    assert load_records(path) == records
    if not records:
        return
    # Cut the file anywhere: what loads is a prefix of the records, never garbage.
    content = path.read_bytes()
    cut = data.draw(st.integers(0, len(content)))
    path.write_bytes(content[:cut])
    loaded = load_records(path, repair=True)
    assert loaded == records[: content[:cut].count(b"\n")]
    # After the repair the next append starts on a fresh line.
    append_record(path, {"index": -1})
    assert load_records(path) == [*loaded, {"index": -1}]


def test_load_records_refuses_a_damaged_middle_line(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"index": 0}\nnot json\n{"index": 2}\n')
    with pytest.raises(DataError, match=r"run\.jsonl:2: not a JSON object"):
        load_records(path)
    assert load_records(tmp_path / "absent.jsonl") == []


def test_write_atomic_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_atomic(path, "one")
    write_atomic(path, b"two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_check_out_dir_refuses_other_settings(tmp_path):
    settings = {"model": "m", "system": "s", "target_start": "auto", "data_sha256": "abc",
                "ks": [1]}
    check_out_dir(tmp_path, settings)
    check_out_dir(tmp_path, {**settings, "ks": [1, 3]})  # more runs: fine
    with pytest.raises(DataError, match=r"model: stored 'm', now 'other'"):
        check_out_dir(tmp_path, {**settings, "model": "other"})


def _trace(source: str, target: str, delays, *, finish="eos") -> Trace:
    words = source.split()
    events, read = [], 0
    for i, (word, delay) in enumerate(zip(target.split(), delays, strict=True)):
        while read < delay:
            events.append(Read(read, words[read], (1,), 0.1 * len(events)))
            read += 1
        events.append(Write(i, (" " if i else "") + word, (2, 3), 0.1 * len(events)))
    events += [Read(j, words[j], (1,), 0.1 * len(events)) for j in range(read, len(words))]
    events.append(Finish(finish, 0.1 * len(events)))
    settings = Settings(model="m", k=2, layout="group", system="s")
    return Trace(settings, tuple(words), tuple(events))


def test_summarize_matches_sacrebleu_and_the_metrics():
    pairs = [Pair("a b c d", "w x y z", 1), Pair("e f g", "u v", 2), Pair("h i", "t", 3)]
    traces = [_trace("a b c d", "w x q z", [2, 3, 4, 4]), _trace("e f g", "u", [2]),
              _trace("h i", "", [])]
    records = [{"index": i, "trace": t.to_jsonl(), "seconds": 0.5, "generated_tokens": 4}
               for i, t in enumerate(traces)]
    got = summarize(RunSpec("group", 2), pairs, records, word_duration=0.5)
    hyps, refs = ["w x q z", "u", ""], ["w x y z", "u v", "t"]
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert got["sentences"] == 3 and got["empty_hypotheses"] == 1
    scored = list(zip(traces[:2], [4, 2], strict=True))
    for key in metrics.METRICS:
        ref_len = [metrics.latency_scores(t, n)[key] for t, n in scored]
        hyp_len = [metrics.latency_scores(t)[key] for t in traces[:2]]
        assert got["latency_reference_length"][key] == pytest.approx(sum(ref_len) / 2)
        assert got["latency_hypothesis_length"][key] == pytest.approx(sum(hyp_len) / 2)
    ca = [metrics.latency_scores(t, n, word_duration=0.5)["AL_CA"]
          for t, n in scored]
    assert got["latency_reference_length"]["AL_CA"] == pytest.approx(sum(ca) / 2)
    assert got["tokens_per_s"] == pytest.approx(12 / 1.5)
    assert got["finish_reasons"] == {"eos": 3}


def test_summarize_adds_yaal_and_the_degeneracy_test():
    # Sentence 1 writes before the end (YAAL defined), sentence 2 only at the end.
    pairs = [Pair("a b c d", "w x y z", 1), Pair("e f g", "u v", 2)]
    traces = [_trace("a b c d", "w x y z", [2, 3, 4, 4]), _trace("e f g", "u v", [3, 3])]
    records = [{"index": i, "trace": t.to_jsonl(), "seconds": 0.5, "generated_tokens": 4}
               for i, t in enumerate(traces)]
    got = summarize(RunSpec("group", 2), pairs, records, word_duration=0.5)
    # A mean over the sentences where YAAL is defined (OmniSTEval skips the others).
    assert got["latency_reference_length"]["YAAL"] == pytest.approx(
        metrics.yaal([2, 3, 4, 4], 4, 4))
    assert got["degeneracy"] == metrics.degeneracy([([2, 3, 4, 4], 4, 4), ([3, 3], 3, 2)])
    table = evaluate.omnisteval_table([got])
    names = [column.header for column in table.columns]
    assert names == ["run", "YAAL", "CA-YAAL", "SWF", "EFSW", "DSPTV", "degenerate"]
    assert list(table.columns[names.index("degenerate")].cells) == ["no"]
    older = evaluate.omnisteval_table([{**got, "degeneracy": None}])  # stored before it
    assert list(older.columns[names.index("degenerate")].cells) == ["-"]
    # It fits an 80-column terminal with the longest run name (results_table fills one).
    from rich.console import Console

    console = Console(width=80, record=True)
    console.print(evaluate.omnisteval_table([{**got, "run": "interleaved-k9"}]))
    assert "interleaved-k9" in console.export_text()


def test_summarize_of_nothing_is_nan_not_an_error():
    got = summarize(RunSpec("group", 2), [Pair("a", "b", 1)], [])
    assert got["sentences"] == 0 and math.isnan(got["bleu"])


# --- a whole evaluation with the tiny model ------------------------------------------------

PAIRS = [Pair("The weather is nice", "Il fait beau", 1),
         Pair("I want to buy a car", "Je veux acheter une voiture", 2)]


@pytest.fixture(scope="module")
def tiny():
    from simulref.testing import tiny_model, tiny_tokenizer

    return tiny_model("llama", seed=1), tiny_tokenizer()


def _evaluation(tiny, out, specs=None, batch_size=1):
    model, tokenizer = tiny
    settings = {"model": "tiny", "system": default_system(None), "target_start": "auto",
                "max_tokens_per_word": 3, "stop_at_first_eos": False,
                "data_sha256": evaluate.sha256_of(PAIRS)}
    return Evaluation(model=model, tokenizer=tokenizer, pairs=PAIRS,
                      specs=specs or run_specs(["group"], [1, 2]), out=out,
                      settings=settings, config=DecodeConfig(max_tokens_per_word=3),
                      batch_size=batch_size)


def _untimed(path):
    return [t.without_times() for t in read_traces(path)]


def test_evaluation_writes_results_traces_and_plots_and_resumes(tiny, tmp_path):
    seen = []
    job = _evaluation(tiny, tmp_path)
    summaries = job.run(lambda spec, done, total: seen.append((spec.name, done, total)))
    assert seen == [(name, d, 2) for name in ("group-k1", "group-k2", "offline")
                    for d in (0, 1, 2)]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["run"] for r in results["runs"]] == ["group-k1", "group-k2", "offline"]
    assert [r["k"] for r in summaries] == [1, 2, None]
    for spec in job.specs:
        traces = read_traces(tmp_path / spec.traces_file)
        assert [t.source_words for t in traces] == [tuple(p.source.split()) for p in PAIRS]
        if spec.offline:  # everything read before the first write
            assert all(set(t.delays) <= {len(t.source_words)} for t in traces)
        else:
            assert all(t.settings.k == spec.k for t in traces)
        # Times count from the start of each sentence's stream, so none exceeds the
        # sentence's wall time.
        for record in load_records(tmp_path / spec.progress_file):
            events = Trace.from_jsonl(record["trace"]).events
            assert all(0 <= e.t <= record["seconds"] for e in events)
    paths = evaluate.write_plots(job, summaries, sentence=1)
    assert sorted(p.name for p in paths) == [
        "quality-latency-ca.png", "quality-latency-ca.svg", "quality-latency.png",
        "quality-latency.svg", "staircase.png", "staircase.svg"]

    # A rerun decodes nothing: the progress files stay byte for byte the same.
    before = {p: p.read_bytes() for p in (tmp_path / "progress").iterdir()}
    again = _evaluation(tiny, tmp_path).run()
    assert {p: p.read_bytes() for p in (tmp_path / "progress").iterdir()} == before
    assert [s["bleu"] for s in again] == [s["bleu"] for s in summaries]


def test_an_interrupted_run_resumes_to_the_same_traces(tiny, tmp_path):
    specs = [RunSpec("group", 2)]
    _evaluation(tiny, tmp_path / "whole", specs).run()
    whole = _untimed(tmp_path / "whole" / specs[0].traces_file)

    # Simulate a kill during the second sentence's append: half its line on disk.
    _evaluation(tiny, tmp_path / "cut", specs).run()
    progress = tmp_path / "cut" / specs[0].progress_file
    lines = progress.read_bytes().splitlines(keepends=True)
    progress.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])
    _evaluation(tiny, tmp_path / "cut", specs).run()
    assert len(load_records(progress)) == 2
    assert _untimed(tmp_path / "cut" / specs[0].traces_file) == whole


def test_a_batched_eval_is_killed_and_resumed_to_the_one_at_a_time_results(tiny, tmp_path):
    """Every run's sentences in one batch: the same traces files as one at a time; killed
    after two sentences (the records of the finished ones are on disk, nothing else), a
    rerun decodes only the rest."""
    specs = run_specs(["group", "interleaved"], [1, 2])
    _evaluation(tiny, tmp_path / "one", specs).run()
    seen = []

    def kill_after_two(spec, done, total):
        seen.append((spec, done, total))
        if done == 2:
            raise KeyboardInterrupt

    job = _evaluation(tiny, tmp_path / "batch", specs, batch_size=3)
    with pytest.raises(KeyboardInterrupt):
        job.run(kill_after_two)
    assert seen == [(None, 0, 10), (None, 1, 10), (None, 2, 10)]
    stored = sum(len(load_records(tmp_path / "batch" / s.progress_file)) for s in specs)
    assert stored == 2 and not (tmp_path / "batch" / "results.json").exists()
    seen.clear()
    _evaluation(tiny, tmp_path / "batch", specs, batch_size=3).run(
        lambda *a: seen.append(a))
    assert seen[0] == (None, 2, 10) and seen[-1] == (None, 10, 10) and len(seen) == 9
    for spec in specs:
        one = _untimed(tmp_path / "one" / spec.traces_file)
        batched = _untimed(tmp_path / "batch" / spec.traces_file)
        assert [t.settings.option("engine") for t in batched] == ["batched"] * len(PAIRS)
        assert [untimed(t) for t in batched] == [untimed(t) for t in one], spec.name
    for record in load_records(tmp_path / "batch" / specs[0].progress_file):
        assert 0 < record["compute_seconds"] <= record["seconds"] + 1e-6


def test_generated_tokens_count_written_words_and_blank_runs_only():
    settings = Settings(model="m", k=1, layout="group", system="S")
    trace = Trace(settings, ("a", "b"), (
        Read(0, "a", (1, 2, 3)), BlankRun(0, (9, 9)), Read(1, "b", (4,)),
        Write(0, " x", (5, 6, 7)), Finish("eos")))
    assert evaluate.generated_tokens(trace) == 5


def test_a_byte_order_mark_is_not_part_of_the_first_word(tmp_path):
    path = tmp_path / "bom.tsv"
    path.write_bytes(b"\xef\xbb\xbfThe weather\tIl fait\nnice day\tbeau jour\n")
    pairs = evaluate.read_pairs(path)
    assert [p.source for p in pairs] == ["The weather", "nice day"]


# --- the resume guard: what must match for stored sentences to be reused --------------


def _settings(tmp_path, **options):
    """eval_settings of a tiny eval, ``options`` overriding its keyword arguments."""
    keywords = dict(config=DecodeConfig(), model="m", dtype="float32", adapter=None,
                    data="dev.tsv", pairs=PAIRS, ks=[1], layouts=["group"],
                    word_duration=0.4)
    keywords.update(options)
    return evaluate.eval_settings(**keywords)


def _adapter(directory, weights: bytes):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapters.safetensors").write_bytes(weights)
    (directory / "adapter_config.json").write_text('{"num_layers": 1}')
    return directory


def _other_value(name: str):
    """A value of each DecodeConfig option other than its default (a test per option:
    a new option has no entry here and fails the test below until it gets one)."""
    from simulref.prompt import ChatFormat

    def custom_sampler(logprobs):
        return logprobs.argmax(axis=-1)

    from simulref.policy import WaitK

    return {
        "policy": WaitK(2), "system": "Translate to German", "target_start": 5,
        "max_tokens_per_word": 7,
        "max_new_words": 4, "stop_at_first_eos": True, "sampler": custom_sampler,
        "chat_format": ChatFormat(prefix="<s>{system}\n", suffix="\n", header="A:"),
        "engine": "incremental",
    }[name]


def test_every_decode_option_changes_the_fingerprint(tmp_path):
    """Each DecodeConfig field is either per run (k, layout: the RunSpec and its files
    hold them) or in the fingerprint: iterating over the fields, a new option cannot be
    forgotten."""
    import dataclasses as dc

    base = evaluate.settings_fingerprint(_settings(tmp_path))
    for field_ in dc.fields(DecodeConfig):
        if field_.name in evaluate.PER_RUN_OPTIONS:
            continue
        config = DecodeConfig.of(DecodeConfig(), **{field_.name: _other_value(field_.name)})
        settings = _settings(tmp_path, config=config)
        assert evaluate.settings_fingerprint(settings) != base, field_.name
        for _ in range(2):  # recorded, then read back from settings.json as the same
            check_out_dir(tmp_path / field_.name, settings)
    assert evaluate.PER_RUN_OPTIONS == {"k", "layout"}


def test_model_dtype_adapter_content_and_data_change_the_fingerprint(tmp_path):
    base = evaluate.settings_fingerprint(_settings(tmp_path))
    one = _adapter(tmp_path / "one", b"weights one")
    with_one = evaluate.settings_fingerprint(_settings(tmp_path, adapter=one))
    others = {
        "model": _settings(tmp_path, model="other"),
        "dtype": _settings(tmp_path, dtype="bfloat16"),
        "adapter": _settings(tmp_path, adapter=one),
        "data": _settings(tmp_path, pairs=PAIRS[:1]),
    }
    for what, settings in others.items():
        assert evaluate.settings_fingerprint(settings) != base, what
    # The adapter counts by content: the same files elsewhere are the same adapter,
    # new weights in the same directory another one.
    copy = _adapter(tmp_path / "copy", b"weights one")
    assert evaluate.settings_fingerprint(_settings(tmp_path, adapter=copy)) == with_one
    _adapter(one, b"weights two")
    assert evaluate.settings_fingerprint(_settings(tmp_path, adapter=one)) != with_one


def test_what_changes_no_trace_may_differ_on_a_resume(tmp_path):
    base = evaluate.settings_fingerprint(_settings(tmp_path))
    for options in ({"data": "./dev.tsv"}, {"ks": [1, 3, 5]}, {"layouts": ["interleaved"]},
                    {"word_duration": 1.0}):
        settings = _settings(tmp_path, **options)
        assert evaluate.settings_fingerprint(settings) == base, options


def test_a_resume_without_the_adapter_or_in_another_dtype_is_refused(tmp_path):
    """Issue 21, item 1: the stored sentences of an eval with --adapter A were scored
    with those of a rerun without it (and another --dtype decoded nothing)."""
    adapter = _adapter(tmp_path / "A", b"weights")
    out = tmp_path / "out"
    check_out_dir(out, _settings(tmp_path, adapter=adapter))
    with pytest.raises(DataError, match=r"adapter_sha256: stored '[0-9a-f]{64}', now None"):
        check_out_dir(out, _settings(tmp_path))
    with pytest.raises(DataError, match=r"dtype: stored 'float32', now 'bfloat16'"):
        check_out_dir(out, _settings(tmp_path, adapter=adapter, dtype="bfloat16"))
    check_out_dir(out, _settings(tmp_path, adapter=adapter, ks=[1, 3]))  # more runs: fine


def test_an_old_settings_file_without_a_key_is_refused_naming_it(tmp_path):
    stored = _settings(tmp_path)
    del stored["dtype"]
    (tmp_path / "settings.json").write_text(json.dumps(stored))
    with pytest.raises(DataError, match=r"dtype: stored \(not recorded\), now 'float32'"):
        check_out_dir(tmp_path, _settings(tmp_path))


def test_a_full_disk_during_an_eval_leaves_no_half_record_and_resumes(tiny, tmp_path,
                                                                       monkeypatch):
    """Issue 21, item 4: a full disk is a WriteError (one line, naming the file), the
    progress file keeps only whole records, and a rerun finishes the same traces."""
    import errno
    import os

    from simulref import atomic

    specs = [RunSpec("group", 2)]
    _evaluation(tiny, tmp_path / "whole", specs).run()
    real_write, calls = os.write, []

    def full_on_the_second_record(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            real_write(fd, data[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(atomic.os, "write", full_on_the_second_record)
    with pytest.raises(atomic.WriteError, match=r"progress/group-k2.jsonl: cannot write "
                                                r"\(No space left on device\)"):
        _evaluation(tiny, tmp_path / "cut", specs).run()
    progress = tmp_path / "cut" / specs[0].progress_file
    assert progress.read_bytes().endswith(b"\n") and len(load_records(progress)) == 1
    monkeypatch.setattr(atomic.os, "write", real_write)
    _evaluation(tiny, tmp_path / "cut", specs).run()
    assert _untimed(tmp_path / "cut" / specs[0].traces_file) == \
        _untimed(tmp_path / "whole" / specs[0].traces_file)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_an_eval_that_fails_before_its_first_record_leaves_no_settings(tiny, tmp_path,
                                                                       monkeypatch,
                                                                       batch_size):
    """Issue 21, item 2: `eval --engine fused` crashed and left settings.json (and the
    lock) behind. Whatever fails before the first record is stored, the settings this
    run wrote go again; once a record is stored they stay (the resume guard)."""
    from simulref import batch, decoder

    def crash(*args, **kwargs):
        raise RuntimeError("the engine crashed")

    monkeypatch.setattr(decoder, "translate", crash)
    monkeypatch.setattr(batch, "decode_items", crash)
    with evaluate.lock_out_dir(tmp_path / "out") as _lock:
        with pytest.raises(RuntimeError, match="crashed"):
            _evaluation(tiny, tmp_path / "out", batch_size=batch_size).run()
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()

    specs = [RunSpec("group", 1)]
    calls = []
    real = decoder.translate

    def crash_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the engine crashed")
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder, "translate", crash_on_the_second)
    with pytest.raises(RuntimeError):
        _evaluation(tiny, tmp_path / "kept", specs).run()
    assert (tmp_path / "kept" / "settings.json").is_file()
