"""simulref.distributed without a launcher: the partition (property tests), the settings
and sharing checks, the union of progress files, the per-rank locks, and whole plans run
by ranks that are threads of this process (:class:`ThreadRanks`: the collective
operations over a shared list). The two-rank runs under ``mlx.launch`` are in
test_distributed_launch.py."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulref import distributed
from simulref.distributed import (
    compared_settings,
    directory_owner,
    gather_mode,
    launched,
    partition,
    settings_differences,
)
from simulref.evaluate import (
    DataError,
    Evaluation,
    Pair,
    RunSpec,
    append_record,
    load_records,
    lock_out_dir,
    progress_files,
    run_records,
    run_specs,
)
from simulref.trace import Finish, Read, Settings, Trace, Write, read_traces

# --- the partition -----------------------------------------------------------------------

costs_lists = st.lists(st.integers(min_value=1, max_value=60), max_size=80)
sizes = st.integers(min_value=1, max_value=9)


def _loads(costs, parts):
    return [sum(costs[j] for j in part) for part in parts]


@given(costs_lists, sizes)
def test_partition_is_disjoint_covers_everything_and_keeps_item_order(costs, size):
    parts = partition(costs, size)
    assert len(parts) == size
    flat = [j for part in parts for j in part]
    assert sorted(flat) == list(range(len(costs)))  # each item exactly once
    assert all(part == sorted(part) for part in parts)


@given(costs_lists, sizes)
def test_partition_is_deterministic(costs, size):
    assert partition(costs, size) == partition(list(costs), size)


@given(costs_lists, sizes)
def test_partition_balances_within_one_longest_item(costs, size):
    loads = _loads(costs, partition(costs, size))
    assert max(loads) - min(loads) <= max(costs, default=0)


def test_partition_examples():
    assert partition([5, 1, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4, 5]]
    assert partition([2, 2, 2, 2], 2) == [[0, 2], [1, 3]]  # equal costs: item order
    assert partition([3, 1], 3) == [[0], [1], []]
    assert partition([], 2) == [[], []]
    with pytest.raises(ValueError, match="size: expected an int >= 1, got 0"):
        partition([1], 0)


def test_launched_by_the_launchers_variables():
    assert not launched({})
    assert launched({"MLX_RANK": "0"})
    assert launched({"OMPI_COMM_WORLD_SIZE": "2"})
    assert not launched({"MLX_RANK": ""})
    assert distributed.join({}) is None  # no launcher: one process, MLX not asked


# --- the checks --------------------------------------------------------------------------


def test_settings_differences_name_the_key_and_both_values():
    specs = run_specs(["group"], [1])
    mine = compared_settings({"model": "a", "data": "/x/dev.tsv", "ks": [1]}, specs,
                             dtype=None)
    theirs = compared_settings({"model": "b", "data": "/y/dev.tsv", "ks": [1]}, specs,
                               dtype=None)
    assert "data" not in mine  # the path may differ from host to host; its hash may not
    assert settings_differences([mine, mine]) == []
    assert settings_differences([mine, theirs]) == ["model: rank 0 has 'a', rank 1 'b'"]


def test_gather_mode():
    shared, blind = [[True, True], [True, True]], [[True, False], [False, True]]
    assert gather_mode("auto", shared) == "files"
    assert gather_mode("auto", blind) == "network"
    assert gather_mode("network", shared) == "network"
    assert gather_mode("files", shared) == "files"
    with pytest.raises(DataError, match="--gather files: rank 0 does not see rank 1's"):
        gather_mode("files", blind)


def test_directory_owner_is_the_lowest_rank_that_shares_it():
    sees = [[True, False, False], [False, True, True], [False, True, True]]
    assert [directory_owner(sees, r) for r in range(3)] == [0, 1, 1]


# --- files -------------------------------------------------------------------------------


def test_run_records_are_the_union_of_every_rank_s_progress_file(tmp_path):
    spec = RunSpec("group", 3)
    for rank, indices in ((0, [0, 1]), (2, [2, 1]), (10, [4])):
        for index in indices:
            append_record(tmp_path / spec.rank_progress_file(rank), {"index": index,
                                                                     "rank": rank})
    append_record(tmp_path / RunSpec("group", 30).rank_progress_file(1), {"index": 3})
    names = [p.name for p in progress_files(tmp_path, spec)]
    assert names == ["group-k3.jsonl", "group-k3.rank2.jsonl", "group-k3.rank10.jsonl"]
    records = run_records(tmp_path, spec)
    assert [(r["index"], r["rank"]) for r in records] == [(0, 0), (1, 0), (2, 2), (4, 10)]

    # A partial last line (an append in progress, or a rank killed in one) is skipped;
    # only the file of the rank named by ``repair`` is cut.
    other = tmp_path / spec.rank_progress_file(2)
    with open(other, "ab") as handle:
        handle.write(b'{"index": 5')
    assert len(run_records(tmp_path, spec, repair=0)) == 4
    assert other.read_bytes().endswith(b'{"index": 5')
    run_records(tmp_path, spec, repair=2)
    assert other.read_bytes().endswith(b"\n")


def test_rank_locks(tmp_path):
    out = tmp_path / "out"
    rank0 = lock_out_dir(out)
    with lock_out_dir(out, rank=1):  # rank 0 and rank 1 side by side
        assert sorted(p.name for p in out.iterdir()) == [".lock", ".rank1.lock"]
        with pytest.raises(DataError, match="another simulref eval is using this directory"):
            lock_out_dir(out, rank=1)  # a second rank 1
        with pytest.raises(DataError, match="another simulref eval"):
            lock_out_dir(out)
    rank0.release()  # the creator, last: nothing but the locks was ever there
    assert not out.exists()


# --- whole plans, ranks as threads -------------------------------------------------------


class Hub:
    """What the ranks' collectives meet in."""

    def __init__(self, size: int):
        self.size = size
        self.slots: list = [None] * size
        self.meet = threading.Barrier(size, timeout=20)


class ThreadRanks:
    """The :class:`simulref.distributed.Ranks` interface for a rank that is a thread."""

    def __init__(self, hub: Hub, rank: int):
        self.hub, self.rank, self.size = hub, rank, hub.size
        self.tag = f"rank {rank}/{hub.size}"

    def all_gather_bytes(self, payload: bytes) -> list[bytes]:
        self.hub.slots[self.rank] = bytes(payload)
        self.hub.meet.wait()
        out = list(self.hub.slots)
        self.hub.meet.wait()
        return out

    def barrier(self) -> None:
        self.all_gather_bytes(b"")


def on_ranks(size: int, work) -> list:
    """``work(ranks)`` on ``size`` thread ranks; each one's result or exception."""
    hub = Hub(size)
    results: list = [None] * size

    def main(rank):
        try:
            results[rank] = work(ThreadRanks(hub, rank))
        except Exception as error:  # noqa: BLE001 - handed to the test
            results[rank] = error

    threads = [threading.Thread(target=main, args=(r,)) for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


PAIRS = [Pair(s, s.upper(), n) for n, s in enumerate(
    ["a b c", "d e", "f g h i j", "k", "l m n o", "p q r"], start=1)]
SETTINGS = {"model": "fake", "system": "S", "data": "dev.tsv", "data_sha256": "0" * 64,
            "target_start": "auto", "max_tokens_per_word": 4, "stop_at_first_eos": False}
SPECS = run_specs(["group"], [1, 2])


class FakeEvaluation(Evaluation):
    """The real bookkeeping (pending, store, finish) over a fake decoder: every word read,
    then written upper-cased."""

    def translate(self, spec, source):
        words = source.split()
        settings = Settings(model="fake", k=spec.k, layout=spec.layout, system="S")
        events = [Read(i, w, (i,)) for i, w in enumerate(words)]
        events += [Write(i, " " + w.upper(), (i,)) for i, w in enumerate(words)]
        return Trace(settings, tuple(words), (*events, Finish("eos")))


def _prepare(ranks, out: Path, settings=SETTINGS, gather="auto"):
    compared = compared_settings(settings, SPECS)
    return distributed.prepare(ranks, out, settings, compared, SPECS,
                               [p.source for p in PAIRS], gather)


def _run(ranks, out: Path, gather="auto", say=None):
    lock, plan = _prepare(ranks, out, gather=gather)
    with lock:
        job = FakeEvaluation(model=None, tokenizer=None, pairs=PAIRS, specs=SPECS, out=out,
                             settings=SETTINGS, **plan.job_options())
        return plan, plan.run(job, say=say or (lambda line: None))


def _records(out: Path) -> dict:
    """{(run, sentence): trace text} over every progress file."""
    return {(spec.name, r["index"]): r["trace"] for spec in SPECS
            for r in run_records(out, spec)}


def _single(out: Path) -> dict:
    FakeEvaluation(model=None, tokenizer=None, pairs=PAIRS, specs=SPECS, out=out,
                   settings=SETTINGS).run()
    return _records(out)


def _untimed_results(out: Path) -> list:
    runs = json.loads((out / "results.json").read_text())["runs"]
    for run in runs:
        del run["seconds"], run["tokens_per_s"]
        run["latency_reference_length"] = {
            k: v for k, v in run["latency_reference_length"].items() if not k.endswith("_CA")}
    return runs


def _untimed(records: dict) -> dict:
    return {key: Trace.from_jsonl(text).without_times() for key, text in records.items()}


def test_ranks_sharing_a_directory_split_the_items_and_rank_0_writes_the_results(tmp_path):
    single = _single(tmp_path / "single")
    out = tmp_path / "out"
    results = on_ranks(2, lambda ranks: _run(ranks, out))
    (plan0, summaries), (plan1, nothing) = results
    assert plan0.mode == plan1.mode == "files"
    assert nothing is None
    assert [s["run"] for s in summaries] == ["group-k1", "group-k2", "offline"]
    assert not plan0.share & plan1.share
    assert plan0.share | plan1.share == set(single)
    # Each rank wrote its own files only: rank 1 its .rank1 progress files.
    rank1 = {(spec.name, r["index"]) for spec in SPECS
             for r in load_records(out / spec.rank_progress_file(1))}
    assert rank1 == plan1.share
    assert _untimed(_records(out)) == _untimed(single)
    assert _untimed_results(out) == _untimed_results(tmp_path / "single")
    for spec in SPECS:  # the traces files in sentence order, as one process writes them
        assert [t.without_times() for t in read_traces(out / spec.traces_file)] == [
            t.without_times() for t in read_traces(tmp_path / "single" / spec.traces_file)]


def test_ranks_without_a_shared_directory_gather_over_the_network(tmp_path):
    single = _single(tmp_path / "single")
    outs = [tmp_path / "host0" / "out", tmp_path / "host1" / "out"]
    lines: list = []
    results = on_ranks(2, lambda ranks: _run(ranks, outs[ranks.rank], say=lines.append))
    assert [plan.mode for plan, _ in results] == ["network", "network"]
    assert "records gathered over mx.distributed (the ranks do not share --out)" in lines[0]
    sent = len(results[1][0].share)
    assert (f"simulref eval: received {sent} records from the other ranks ({sent} new: "
            f"the others were in the progress files here already)") in lines
    # Rank 0 appended rank 1's records to its own progress files: host 0 has everything.
    assert _untimed(_records(outs[0])) == _untimed(single)
    assert _untimed_results(outs[0]) == _untimed_results(tmp_path / "single")
    # Host 1 keeps its own records and its own settings.json (its resume guard).
    assert set(_records(outs[1])) == results[1][0].share
    assert (outs[1] / "settings.json").exists() and not (outs[1] / "results.json").exists()


def test_forced_files_gather_without_a_shared_directory_is_refused_on_every_rank(tmp_path):
    results = on_ranks(2, lambda ranks: _prepare(ranks, tmp_path / f"host{ranks.rank}",
                                                 gather="files"))
    for error in results:
        assert isinstance(error, DataError)
        assert "--gather files: rank 0 does not see rank 1's files" in str(error)
    assert not (tmp_path / "host0").exists() and not (tmp_path / "host1").exists()


def test_other_settings_on_a_rank_are_refused_on_every_rank(tmp_path):
    def work(ranks):
        settings = {**SETTINGS, "max_tokens_per_word": 4 + ranks.rank}
        return _prepare(ranks, tmp_path / "out", settings=settings)

    for error in on_ranks(2, work):
        assert isinstance(error, DataError)
        assert str(error) == (
            "the ranks were launched with different settings (max_tokens_per_word: rank 0 "
            "has 4, rank 1 5); launch every rank with the same command")
    assert not (tmp_path / "out").exists()  # nothing left behind


def test_a_rank_that_cannot_lock_its_directory_stops_every_rank(tmp_path):
    out = tmp_path / "out"
    with lock_out_dir(out, rank=1):  # another eval's rank 1
        for error in on_ranks(2, lambda ranks: _prepare(ranks, out)):
            assert isinstance(error, DataError)
            assert str(error).startswith(f"rank 1: --out {out}: another simulref eval")
    assert not out.exists()


def test_a_resume_with_other_ranks_decodes_only_what_no_rank_has(tmp_path):
    single = _single(tmp_path / "single")
    out = tmp_path / "out"
    # A one-process run did two items, an earlier rank 2 another (and died).
    for key in [("group-k1", 0), ("group-k2", 4)]:
        spec = next(s for s in SPECS if s.name == key[0])
        append_record(out / spec.progress_file, _record_of(tmp_path / "single", spec, key[1]))
    spec = SPECS[0]
    append_record(out / spec.rank_progress_file(2), _record_of(tmp_path / "single", spec, 5))
    results = on_ranks(3, lambda ranks: _run(ranks, out))
    shares = [plan.share for plan, _ in results]
    assert sum(len(s) for s in shares) == len(single) - 3
    assert not {("group-k1", 0), ("group-k2", 4), ("group-k1", 5)} & set().union(*shares)
    assert _untimed(_records(out)) == _untimed(single)


def _record_of(out: Path, spec: RunSpec, index: int) -> dict:
    return next(r for r in run_records(out, spec) if r["index"] == index)


def test_records_rank_0_cannot_see_in_a_shared_directory_come_over_the_network(tmp_path):
    """As if a network filesystem hid rank 1's new files from rank 0 (a cached listing):
    the ranks took the directory for shared, but rank 0 gets the records anyway."""
    single = _single(tmp_path / "single")
    outs = [tmp_path / "host0", tmp_path / "host1"]
    lines: list = []

    def work(ranks):
        lock, plan = _prepare(ranks, outs[ranks.rank])
        plan.mode = "files"  # what the ranks would have concluded
        with lock:
            job = FakeEvaluation(model=None, tokenizer=None, pairs=PAIRS, specs=SPECS,
                                 out=outs[ranks.rank], settings=SETTINGS,
                                 **plan.job_options())
            return plan, plan.run(job, say=lines.append)

    results = on_ranks(2, work)
    sent = len(results[1][0].share)
    assert (f"simulref eval: {sent} records are not in the shared directory yet; getting "
            f"them over mx.distributed") in lines
    assert _untimed(_records(outs[0])) == _untimed(single)
