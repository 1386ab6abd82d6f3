"""One ``simulref eval`` shared by the ranks of an MLX distributed group (``mlx.launch``,
``mx.distributed``): every rank decodes a disjoint share of the (run, sentence) items,
and rank 0 gathers the records and writes what a single process writes. See
docs/distributed.md.

- :func:`join`: the group, when a launcher started the process (``mlx.launch`` sets
  ``MLX_RANK``, ``mpirun`` ``OMPI_COMM_WORLD_SIZE`` or ``PMI_SIZE``) and it has more than
  one rank; None otherwise, and then nothing here is used (one process, as before).
- :func:`prepare`, before the model loads, collective (every rank ends it the same way):
  each rank's own checks of ``--out`` and its lock, the settings compared across ranks,
  whether the ranks share the output directory, the items no rank has stored yet, and
  :func:`partition` of those over the ranks.
- :meth:`Plan.run`: this rank decodes its share (the same :class:`Evaluation`
  machinery, batched or not), appending each record to its own progress files; then
  rank 0 gathers them. ``files``: the ranks meet (a barrier) and rank 0 reads the other
  ranks' progress files in the shared directory. ``network``: the ranks send rank 0 the
  records it lacks over ``mx.distributed`` and rank 0 appends them to its own files.
  Rank 0 then writes the traces, ``results.json`` and the plots.

Files: rank R appends to ``progress/{run}.rank{R}.jsonl`` (rank 0 to the single-process
file ``progress/{run}.jsonl``) and holds ``.rank{R}.lock`` (rank 0: ``.lock``); only the
lowest rank that sees a directory writes its ``settings.json``; only rank 0 writes
traces, results and plots. No two ranks write the same file.
"""

from __future__ import annotations

import heapq
import json
import os
import secrets
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .evaluate import (
    DataError,
    RunSpec,
    append_record,
    check_out_dir,
    lock_name,
    lock_out_dir,
    run_records,
)

# Set in every rank's environment by the launchers (mlx.launch: all its backends).
LAUNCHER_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
GATHER_MODES = ("auto", "files", "network")
CHUNK = 16 * 2**20  # bytes per all_gather round (memory: ranks x CHUNK)


class RankLost(RuntimeError):
    """A collective operation failed: another rank is gone (killed, crashed)."""


def launched(environ: Mapping[str, str]) -> bool:
    """Whether a distributed launcher started this process."""
    return any(environ.get(name) for name in LAUNCHER_VARIABLES)


class Ranks:
    """The collective operations an eval needs, over an ``mx.distributed`` group."""

    def __init__(self, group, stream=None):
        self.group = group
        self.stream = stream
        self.rank = group.rank()
        self.size = group.size()

    @property
    def tag(self) -> str:
        return f"rank {self.rank}/{self.size}"

    def _gather(self, array):
        import mlx.core as mx

        try:
            out = mx.distributed.all_gather(array, group=self.group, stream=self.stream)
            mx.eval(out)
        except RuntimeError as error:
            raise RankLost(f"{self.tag}: lost the other ranks ({error})") from None
        return out

    def all_gather_bytes(self, payload: bytes) -> list[bytes]:
        """Every rank's ``payload``, in rank order (sizes first, then rounds of up to
        :data:`CHUNK` bytes, each padded to the longest)."""
        import mlx.core as mx
        import numpy as np

        sizes = [int(n) for n in np.array(self._gather(mx.array([len(payload)],
                                                                 dtype=mx.int64)))]
        longest = max(sizes)
        parts = [bytearray() for _ in range(self.size)]
        for start in range(0, longest, CHUNK):
            width = min(CHUNK, longest - start)
            piece = payload[start:start + width].ljust(width, b"\0")
            rows = np.array(self._gather(mx.array(np.frombuffer(piece, dtype=np.uint8))))
            for part, row in zip(parts, rows.reshape(self.size, width), strict=True):
                part += row.tobytes()
        return [bytes(part[:n]) for part, n in zip(parts, sizes, strict=True)]

    def barrier(self) -> None:
        self.all_gather_bytes(b"")


def join(environ: Mapping[str, str] | None = None) -> Ranks | None:
    """The ranks of this eval, or None for a single process (no launcher, or a group of
    one): then nothing else here is called."""
    environ = os.environ if environ is None else environ
    if not launched(environ):
        return None
    import mlx.core as mx

    group = mx.distributed.init()
    if group.size() == 1:
        return None
    # The ring, MPI and JACCL backends communicate from the CPU stream only (their
    # collectives have no GPU kernels); NCCL (mlx.launch sets NCCL_HOST_IP) on the GPU.
    stream = None if environ.get("NCCL_HOST_IP") else mx.cpu
    return Ranks(group, stream)


# --- pure parts --------------------------------------------------------------------------


def partition(costs: Sequence[int], size: int) -> list[list[int]]:
    """The positions of the items each of ``size`` ranks decodes: longest first, each
    onto the least-loaded rank (ties: the lower rank; equal costs: the earlier item
    first); each rank's list in item order. Deterministic, so every rank computes the
    same; the loads end within one largest cost of each other."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected an int >= 1, got {size!r}")
    parts: list[list[int]] = [[] for _ in range(size)]
    loads = [(0, rank) for rank in range(size)]  # a heap of (load, rank)
    for position in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        load, rank = heapq.heappop(loads)
        parts[rank].append(position)
        heapq.heappush(loads, (load + costs[position], rank))
    return [sorted(part) for part in parts]


def item_cost(source: str) -> int:
    """What an item costs to decode, for :func:`partition`: its source words (wait-k
    writes about one target word per source word)."""
    return len(source.split())


def compared_settings(settings: Mapping, specs: Sequence[RunSpec], **options) -> dict:
    """What must be the same on every rank: the eval's settings (but the DATA path,
    which may differ from host to host: its content's hash is compared), the runs and
    ``options`` (decode options outside the settings, e.g. dtype, engine)."""
    from simulref import __version__

    return {**{k: v for k, v in settings.items() if k != "data"},
            "runs": [spec.name for spec in specs], **options, "simulref": __version__}


def settings_differences(every: Sequence[Mapping]) -> list[str]:
    """How each rank's compared settings differ from rank 0's, one phrase per key."""
    first = every[0]
    out = []
    for rank, theirs in enumerate(every[1:], start=1):
        for key in sorted(set(first) | set(theirs)):
            if first.get(key) != theirs.get(key):
                out.append(f"{key}: rank 0 has {first.get(key)!r}, rank {rank} "
                           f"{theirs.get(key)!r}")
    return out


def gather_mode(asked: str, sees: Sequence[Sequence[bool]]) -> str:
    """``files`` or ``network`` for ``--gather asked``, given ``sees[r][s]``: whether
    rank r sees rank s's lock file (hence its progress files) in its ``--out``."""
    if asked not in GATHER_MODES:
        raise ValueError(f"gather: expected one of {GATHER_MODES}, got {asked!r}")
    blind = [(r, s) for r, row in enumerate(sees) for s, seen in enumerate(row) if not seen]
    if asked == "files" and blind:
        r, s = blind[0]
        raise DataError(f"--gather files: rank {r} does not see rank {s}'s files in --out "
                        f"(the ranks do not share that directory); use --gather network "
                        f"or auto")
    if asked == "auto":
        return "network" if blind else "files"
    return asked


def directory_owner(sees: Sequence[Sequence[bool]], rank: int) -> int:
    """The lowest rank that shares ``rank``'s output directory: the one that writes its
    ``settings.json``."""
    return min([rank, *(s for s, seen in enumerate(sees[rank]) if seen)])


# --- the collective steps ----------------------------------------------------------------


def agree(ranks: Ranks, error: str | None) -> None:
    """Raise DataError on every rank when any rank has an ``error`` (naming it)."""
    errors = ranks.all_gather_bytes((error or "").encode())
    failed = [f"rank {r}: {e.decode()}" for r, e in enumerate(errors) if e]
    if failed:
        raise DataError("; ".join(failed))


def _locally(ranks: Ranks, out: Path, step: Callable):
    """``step()`` on this rank, its DataError or OSError agreed on by every rank."""
    result, error = None, None
    try:
        result = step()
    except DataError as e:
        error = str(e)
    except OSError as e:
        error = f"--out {out}: cannot use it as the output directory ({e.strerror or e})"
    agree(ranks, error)
    return result


def check_same_settings(ranks: Ranks, compared: Mapping) -> None:
    payload = json.dumps(compared, sort_keys=True, ensure_ascii=False).encode()
    every = [json.loads(p) for p in ranks.all_gather_bytes(payload)]
    differences = settings_differences(every)
    if differences:
        raise DataError(f"the ranks were launched with different settings "
                        f"({'; '.join(differences)}); launch every rank with the same command")


def who_sees_whom(ranks: Ranks, out: Path, lock_path: Path) -> list[list[bool]]:
    """``sees[r][s]``: each rank writes a fresh random token into its lock file; rank r
    sees rank s when rank s's lock file in r's ``out`` holds s's token."""
    token = secrets.token_hex(16)
    _locally(ranks, out, lambda: lock_path.write_text(token, encoding="ascii"))
    tokens = [t.decode() for t in ranks.all_gather_bytes(token.encode())]  # all written
    mine = bytes(_read(out / lock_name(s)) == tokens[s] for s in range(ranks.size))
    return [[bool(b) for b in row] for row in ranks.all_gather_bytes(mine)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def pending_bitmap(out: Path, specs: Sequence[RunSpec], sentences: int, rank: int) -> bytes:
    """One byte per (run, sentence) item in order: 1 when none of the run's progress
    files this rank sees holds it (this rank's own file repaired, see run_records)."""
    bitmap = bytearray(len(specs) * sentences)
    for n, spec in enumerate(specs):
        done = {r["index"] for r in run_records(out, spec, repair=rank)}
        for index in range(sentences):
            bitmap[n * sentences + index] = index not in done
    return bytes(bitmap)


@dataclass
class Plan:
    """What this rank does: its ``share`` of the pending items, how rank 0 gathers
    (``mode``; ``asked``: the --gather option), and what rank 0 lacked at the start
    (``rank0_pending``: the items the other ranks send it in ``network`` mode)."""

    ranks: Ranks
    out: Path
    specs: list[RunSpec]
    mode: str
    asked: str
    share: frozenset
    pending: int
    rank0_pending: frozenset
    owns_directory: bool  # the lowest rank that sees its --out: it writes settings.json

    def job_options(self) -> dict:
        """The :class:`Evaluation` fields of this rank."""
        return {"rank": self.ranks.rank, "share": self.share}

    def tagged(self, line: str) -> str:
        """A ``simulref eval: ...`` line with this rank named."""
        return line.replace("simulref eval: ", f"simulref eval: {self.ranks.tag}: ", 1)

    def describe(self) -> str:
        how = ("through the shared output directory" if self.mode == "files"
               else "over mx.distributed")
        why = (" (the ranks do not share --out)" if self.asked == "auto"
               and self.mode == "network" else "")
        return (f"{self.ranks.size} ranks; records gathered {how}{why} (--gather "
                f"{self.asked}); this rank decodes {len(self.share)} of the "
                f"{self.pending} pending items")

    def run(self, job, on_progress: Callable | None = None,
            say: Callable[[str], None] | None = None) -> list[dict] | None:
        """Decode this rank's share and gather: rank 0 returns the summaries (and has
        written every file a single process writes), the other ranks None. ``say``
        prints a ``simulref eval: ...`` line (default: on stderr, with the rank)."""
        if say is None:
            def say(line: str) -> None:
                print(self.tagged(line), file=sys.stderr, flush=True)

        say(f"simulref eval: {self.describe()}")
        if self.owns_directory:
            check_out_dir(self.out, job.settings)  # settings.json, as Evaluation.run
        decode_share(job, on_progress)
        if self.mode == "files":
            self.ranks.barrier()  # every rank's records are in its files
            # What rank 0 cannot see yet (a network filesystem's cached listing?) comes
            # over mx.distributed instead; every rank learns whether it must send.
            missing = self._missing(job) if self.ranks.rank == 0 else 0
            if self.ranks.all_gather_bytes(b"1" if missing else b"")[0]:
                if missing:
                    say(f"simulref eval: {missing} records are not in the shared directory "
                        f"yet; getting them over mx.distributed")
                self._send_records(say)
        else:
            self._send_records(say)
        if self.ranks.rank != 0:
            say("simulref eval: done; rank 0 writes the results")
            return None
        missing = self._missing(job)
        if missing:
            say(f"simulref eval: {missing} items are missing (a rank lost its files?); "
                f"rerun the same command to decode them")
        return job.finish()

    def _missing(self, job) -> int:
        return sum(len(job.pairs) - len(run_records(self.out, spec)) for spec in self.specs)

    def _send_records(self, say) -> None:
        """Every rank sends the records rank 0 lacked at the start; rank 0 appends the
        ones it still lacks to its own progress files."""
        lines = []
        if self.ranks.rank != 0:
            for spec in self.specs:
                for record in run_records(self.out, spec):
                    if (spec.name, record["index"]) in self.rank0_pending:
                        lines.append(json.dumps({"run": spec.name, "record": record},
                                                sort_keys=True, ensure_ascii=False))
        payloads = self.ranks.all_gather_bytes("".join(f"{x}\n" for x in lines).encode())
        if self.ranks.rank != 0:
            return
        by_name = {spec.name: spec for spec in self.specs}
        have = {spec.name: {r["index"] for r in run_records(self.out, spec)}
                for spec in self.specs}
        added = received = 0
        for payload in payloads[1:]:
            for line in payload.decode().splitlines():
                received += 1
                sent = json.loads(line)
                spec, record = by_name[sent["run"]], sent["record"]
                if record["index"] not in have[spec.name]:
                    append_record(self.out / spec.progress_file, record)
                    have[spec.name].add(record["index"])
                    added += 1
        say(f"simulref eval: received {received} records from the other ranks ({added} "
            f"new: the others were in the progress files here already)")


def prepare(ranks: Ranks, out: Path, settings: Mapping, compared: Mapping,
            specs: Sequence[RunSpec], sources: Sequence[str], gather: str = "auto"):
    """The collective start of an eval over ``ranks``, before any model loads: returns
    (this rank's held OutDirLock, :class:`Plan`), or raises the same DataError on every
    rank (``--out`` unusable or locked on some rank, settings that differ, ``--gather
    files`` without a shared directory). ``sources``: the sentences' source texts."""
    out = Path(out)
    specs = list(specs)
    lock = None

    def open_out():
        check_out_dir(out, settings, write=False)
        return lock_out_dir(out, ranks.rank)

    try:
        # Rank 0 first: where the ranks share --out, rank 0 is the one that creates it.
        lock = _locally(ranks, out, open_out if ranks.rank == 0 else lambda: None)
        if ranks.rank != 0:
            lock = _locally(ranks, out, open_out)
        else:
            agree(ranks, None)
        check_same_settings(ranks, compared)
        sees = who_sees_whom(ranks, out, lock.path)
        mode = gather_mode(gather, sees)
        bitmaps = ranks.all_gather_bytes(_locally(
            ranks, out, lambda: pending_bitmap(out, specs, len(sources), ranks.rank)))
    except DataError:
        # Every rank is here (each error was agreed on): rank 0 releases last, so when
        # it created --out for nothing it finds only its own lock there and removes it.
        if ranks.rank != 0 and lock is not None:
            lock.release()
        ranks.barrier()
        if ranks.rank == 0 and lock is not None:
            lock.release()
        raise
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    n = len(sources)
    keys = [(specs[j // n].name, j % n) for j in range(len(specs) * n)]
    items = [j for j in range(len(keys)) if all(bitmap[j] for bitmap in bitmaps)]
    parts = partition([item_cost(sources[j % n]) for j in items], ranks.size)
    share = frozenset(keys[items[p]] for p in parts[ranks.rank])
    rank0_pending = frozenset(keys[j] for j in range(len(keys)) if bitmaps[0][j])
    owner = directory_owner(sees, ranks.rank) == ranks.rank
    return lock, Plan(ranks, out, specs, mode, gather, share, len(items), rank0_pending,
                      owner)


def decode_share(job, on_progress: Callable | None = None) -> None:
    """Decode and store ``job``'s pending items of its share, as ``job.run`` would
    (batched when ``job.batch_size`` > 1; else one at a time, run by run), writing no
    run file."""
    if job.batch_size > 1:
        job.decode_batched(on_progress)
        return
    for spec in job.specs:
        job.decode_run(spec, on_progress)
