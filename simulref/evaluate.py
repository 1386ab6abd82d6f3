"""Evaluation over a parallel TSV file: quality (BLEU, chrF) and latency (AP, AL, LAAL,
DAL, ATD) of wait-k runs for several k and layouts, plus an offline (read-all) run.

Layout of an output directory::

    .lock                       held (flock) while an eval runs: a second one is refused
    .rank{R}.lock               held by rank R > 0 of an eval over several ranks
    settings.json               what the stored sentences were produced with (resume guard)
    progress/{run}.jsonl        one record per finished sentence, appended + fsynced
    progress/{run}.rank{R}.jsonl  the same, of rank R > 0 (docs/distributed.md)
    traces-{layout}-k{K}.jsonl  the traces of a run in sentence order (rewritten atomically)
    traces-offline.jsonl
    results.json                corpus scores per run (rewritten atomically)
    quality-latency.{png,svg}   BLEU vs AL, one curve per layout
    staircase.{png,svg}         read/write staircase of one sentence

A rerun with the same output directory skips the sentences already in ``progress/``
(in any of a run's progress files: a rerun may have fewer or more ranks).
An interrupted append leaves at most a partial last line, which is cut off on resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .atomic import append_line, atomic_write
from .config import DecodeConfig, is_greedy
from .metrics import METRICS

# Dataset name -> (package data file, target language name for the instruction).
DATASETS: dict[str, tuple[str, str]] = {
    "postgres-en-fr": ("postgres-en-fr.tsv", "French"),
    "postgres-en-de": ("postgres-en-de.tsv", "German"),
}
LANGUAGE_CODES = {"fr": "French", "de": "German"}
DEFAULT_KS = (1, 3, 5, 7, 9)


class DataError(ValueError):
    """The DATA file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Pair:
    source: str
    reference: str
    line: int  # 1-based line number in the file, for messages


def parse_pairs(text: str, *, name: str = "DATA") -> list[Pair]:
    """``source<TAB>reference`` per line; blank lines are not allowed (except a final
    newline). Raises :class:`DataError` naming ``name`` and the 1-based line."""
    pairs = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        fields = line.split("\t")
        if len(fields) != 2:
            raise DataError(
                f"{name}:{number}: expected 'source<TAB>reference' (2 tab-separated fields), "
                f"found {len(fields)}"
            )
        source, reference = (f.strip() for f in fields)
        if not source or not reference:
            which = "source" if not source else "reference"
            raise DataError(f"{name}:{number}: empty {which}")
        pairs.append(Pair(source, reference, number))
    if not pairs:
        raise DataError(f"{name}: no sentence pairs")
    return pairs


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        # utf-8-sig: a byte-order mark (some editors write one) is not part of the first word.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8") from None
    return parse_pairs(text, name=str(path))


def dataset_path(name: str) -> Path:
    """Path of a bundled dataset (see :data:`DATASETS`)."""
    if name not in DATASETS:
        raise DataError(f"dataset: expected one of {', '.join(DATASETS)}, got {name!r}")
    return Path(str(resources.files("simulref") / "data" / DATASETS[name][0]))


def target_language(dataset: str | None, data: str | os.PathLike | None) -> str | None:
    """The target language a dataset name or a file name like ``x.en-de.tsv`` implies."""
    if dataset is not None:
        return DATASETS[dataset][1]
    if data is not None:
        match = re.search(r"(?:^|[^a-z])en[-_]([a-z]{2})(?:[^a-z]|$)", Path(data).name.lower())
        if match:
            return LANGUAGE_CODES.get(match.group(1))
    return None


def default_system(dataset: str | None, data: str | os.PathLike | None = None) -> str:
    language = target_language(dataset, data) or "French"
    return f"Translate the following English paragraph to {language}"


# --- runs and their files ----------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One evaluation run in ``layout``: wait-k with ``k``; another policy, ``policy``
    (its text form, :func:`simulref.policy.parse_policy`; k is None then); or offline
    (read everything first) when neither is set."""

    layout: str
    k: int | None
    policy: str | None = None

    def __post_init__(self):
        if self.policy is not None:
            from simulref.policy import parse_policy

            # The canonical text (the policy's own name), so one policy is one run.
            object.__setattr__(self, "policy", parse_policy(self.policy).name)
            if self.k is not None:
                raise ValueError(f"RunSpec: k={self.k} and policy={self.policy!r}: "
                                 "expected one of them")

    @property
    def offline(self) -> bool:
        return self.k is None and self.policy is None

    @property
    def family(self) -> str:
        """The policy family a quality-latency curve joins: wait-k, offline, or the
        policy's name up to its parameters ("confidence", "local-agreement")."""
        if self.policy is not None:
            return self.policy.split(":")[0]
        return "offline" if self.offline else "wait-k"

    @property
    def parameter(self) -> str:
        """What tells this run from the others of its family ("0.6", "2:chunk=2")."""
        return self.policy.split(":", 1)[1] if self.policy and ":" in self.policy else ""

    @property
    def name(self) -> str:
        if self.policy is not None:  # file names: no ':' or '=' in them
            return f"{self.layout}-" + re.sub(r"[:=]+", "-", self.policy)
        return "offline" if self.offline else f"{self.layout}-k{self.k}"

    @property
    def traces_file(self) -> str:
        return f"traces-{self.name}.jsonl"

    @property
    def progress_file(self) -> str:
        return f"progress/{self.name}.jsonl"

    def rank_progress_file(self, rank: int) -> str:
        """The progress file rank ``rank`` appends to (rank 0: :attr:`progress_file`)."""
        return self.progress_file if rank == 0 else f"progress/{self.name}.rank{rank}.jsonl"


def run_specs(layouts: Sequence[str], ks: Sequence[int], *, offline: bool = True,
              policies: Sequence[str] = ()) -> list[RunSpec]:
    """Runs in order: for each layout, every wait-k (``ks``), then every other policy
    (``policies``, text forms); then the offline run (in the first layout: with
    everything read first, every layout feeds the same positions)."""
    specs = [spec for layout in dict.fromkeys(layouts) for spec in (
        *(RunSpec(layout, k) for k in dict.fromkeys(ks)),
        *dict.fromkeys(RunSpec(layout, None, policy) for policy in policies))]
    if offline and layouts:
        specs.append(RunSpec(layouts[0], None))
    return specs


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write through a temp file in the same directory, fsync, rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_write(path) as handle:
        handle.write(payload)


def append_record(path: str | os.PathLike, record: Mapping) -> None:
    """Append one JSON line with a single write, then flush and fsync, so an
    interruption leaves either the whole line or a partial last line (cut on resume);
    a full disk cuts the line off again (:func:`simulref.atomic.append_line`) and
    raises :class:`simulref.atomic.WriteError`."""
    line = json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    append_line(path, line)


def load_records(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
    """The complete records of a progress file, in file order.

    A last line without its newline (an interrupted append) is ignored, and with
    ``repair`` cut off the file so the next append starts on a fresh line. A complete
    line that is not a JSON object means the file was damaged otherwise: DataError."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if repair and end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
    records = []
    for number, line in enumerate(data[:end].splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: not a JSON object; remove the file to start over")
        records.append(record)
    return records


def progress_files(out: Path, spec: RunSpec) -> list[Path]:
    """Every progress file of run ``spec`` in ``out``: rank 0's (the one a single process
    writes), then those of the other ranks in rank order."""
    out = Path(out)
    pattern = re.compile(re.escape(spec.name) + r"\.rank([1-9][0-9]*)\.jsonl")
    folder = out / "progress"
    ranks = sorted(int(m.group(1)) for m in (pattern.fullmatch(p.name) for p in (
        folder.iterdir() if folder.is_dir() else ())) if m)
    return [out / spec.rank_progress_file(rank) for rank in (0, *ranks)]


def run_records(out: Path, spec: RunSpec, *, repair: int | None = None) -> list[dict]:
    """The records of run ``spec`` from all its progress files, one per sentence (the
    first found, in :func:`progress_files` order). ``repair``: the rank whose file to
    repair (:func:`load_records`), the one this process appends to; the others' files
    are only read (a partial last line there is another rank's append in progress)."""
    seen: set = set()
    records = []
    for path in progress_files(out, spec):
        own = repair is not None and path == Path(out) / spec.rank_progress_file(repair)
        for record in load_records(path, repair=own):
            if record["index"] not in seen:
                seen.add(record["index"])
                records.append(record)
    return records


# The decode options each run sets for itself: its RunSpec (and its files' names) holds
# them, so they are not part of the eval's settings. (A policy is per run only for the
# offline run, which sets ReadAll, and for a RunSpec with its own policy; one given in the
# shared config applies to every wait-k run, so it is recorded.)
PER_RUN_OPTIONS = frozenset({"k", "layout"})
# Settings that change no trace, so a resume may change them: the paths (their content's
# hash is compared instead: ``./dev.tsv`` and ``dev.tsv`` are the same data), which runs
# and how many sentences there are (each run and sentence has its own record), and the
# pace the computation-aware scores assume (scoring only).
RESUMABLE_SETTINGS = frozenset({"data", "adapter", "sentences", "ks", "layouts",
                                "policies", "word_duration"})


def option_value(value):
    """A decode option as settings.json records it (JSON, and equal for equal options):
    a dataclass (a ChatFormat) as its fields, a greedy sampler as ``"greedy"``, another
    callable by its repr (a closure's names its address, so a resume with a custom sampler
    is refused rather than risk mixing two), anything else not JSON by its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: option_value(getattr(value, f.name))
                for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [option_value(v) for v in value]
    if callable(value):
        return "greedy" if is_greedy(value) else f"custom {value!r}"
    return repr(value)


def decode_settings(config: DecodeConfig) -> dict:
    """Every option of ``config`` but the per-run ones (:data:`PER_RUN_OPTIONS`), by
    field: an option added to DecodeConfig is recorded, and compared on resume, with no
    change here."""
    return {f.name: option_value(getattr(config, f.name))
            for f in dataclasses.fields(DecodeConfig) if f.name not in PER_RUN_OPTIONS}


def eval_settings(config: DecodeConfig, *, model: str, dtype: str | None,
                  adapter: str | os.PathLike | None, data: str, pairs: Sequence[Pair],
                  ks: Sequence[int], layouts: Sequence[str],
                  word_duration: float, policies: Sequence[str] = ()) -> dict:
    """The settings of an eval (settings.json, results.json): the one place they are
    made. ``config``: the decode options every run shares (its ``system`` is the
    eval's); ``dtype`` None is the device's default, recorded as the one that loads;
    ``adapter``: the --adapter directory, recorded as given and by the sha256 of its
    files (an adapter preset's own adapter too, when ``model`` names one)."""
    from .adapters import ADAPTER_PRESETS, adapter_sha256

    if dtype is None:
        from .models import default_dtype

        dtype = default_dtype()
    applied = adapter if adapter is not None else (
        ADAPTER_PRESETS[model].path if model in ADAPTER_PRESETS else None)
    return {
        "model": model, "dtype": dtype,
        "adapter": None if adapter is None else str(adapter),
        "adapter_sha256": None if applied is None else adapter_sha256(applied),
        **decode_settings(config),
        "data": data, "data_sha256": sha256_of(pairs), "sentences": len(pairs),
        "ks": list(ks), "layouts": list(layouts), "policies": list(policies),
        "word_duration": word_duration,
    }


def settings_fingerprint(settings: Mapping) -> dict:
    """The part of the settings that must match for stored sentences to be reused:
    everything but :data:`RESUMABLE_SETTINGS` (a key is compared unless it is known to
    change no trace, so a new one cannot be forgotten)."""
    # Settings made without the adapter's hash (by an older simulref) have only its path
    # to tell adapters apart: compare that then.
    resumable = (RESUMABLE_SETTINGS if "adapter_sha256" in settings
                 else RESUMABLE_SETTINGS - {"adapter"})
    return {key: value for key, value in settings.items() if key not in resumable}


def fingerprint_differences(stored: Mapping, wanted: Mapping) -> list[str]:
    """One phrase per key whose value differs (a key one side lacks: "(not recorded)")."""
    def shown(side: Mapping, key: str) -> str:
        return repr(side[key]) if key in side else "(not recorded)"

    return [f"{key}: stored {shown(stored, key)}, now {shown(wanted, key)}"
            for key in sorted(set(stored) | set(wanted))
            if key not in stored or key not in wanted or stored[key] != wanted[key]]


def sha256_of(pairs: Iterable[Pair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(f"{pair.source}\t{pair.reference}\n".encode())
    return digest.hexdigest()


def check_out_dir(out: Path, settings: Mapping, *, write: bool = True) -> bool:
    """Record ``settings`` in ``out/settings.json`` (unless ``write`` is False), or check
    that the stored ones match (reusing sentences decoded under other settings would mix
    two experiments). Returns whether it wrote the file."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: cannot use it as the output directory (not a directory)")
    path = out / "settings.json"
    wanted = settings_fingerprint(settings)
    if path.exists():
        try:
            stored = settings_fingerprint(json.loads(path.read_text("utf-8")))
        except ValueError:
            raise DataError(f"{path}: not JSON; remove it to start over") from None
        differences = fingerprint_differences(stored, wanted)
        if differences:
            raise DataError(f"--out {out} holds results of other settings "
                            f"({'; '.join(differences)}); use another --out")
        return False
    if write:
        write_atomic(path, json.dumps(dict(settings), indent=2, sort_keys=True) + "\n")
        return True
    return False


def forget_settings_if_nothing_stored(out: Path) -> None:
    """Remove ``out/settings.json`` (and an empty ``progress/``) when no sentence is
    stored: a run that failed before its first record leaves nothing behind (its lock's
    release then removes a directory it made). Once a record is stored, the settings
    stay: they are what guards its resume."""
    folder = Path(out) / "progress"
    stored = folder.is_dir() and any(p.stat().st_size for p in folder.iterdir())
    if stored:
        return
    (Path(out) / "settings.json").unlink(missing_ok=True)
    if folder.is_dir():
        for empty in folder.iterdir():
            empty.unlink(missing_ok=True)
        folder.rmdir()


LOCK_FILE = ".lock"
_LOCK_NAME = re.compile(r"\.lock|\.rank[1-9][0-9]*\.lock")


class OutDirLock:
    """Holds ``out/.lock`` (an ``flock``, released by the kernel even when the process is
    killed) while one ``simulref eval`` uses ``out``: a second one on the same directory
    would decode every sentence again and interleave its appends. Creates ``out``; when
    it created it and nothing but the lock is there at release (the run was refused or
    failed before writing), removes it again, so a refused run leaves nothing behind.
    ``name``: the lock file (rank R > 0 of an eval over several ranks holds
    ``.rank{R}.lock``; rank 0 holds ``.lock``)."""

    def __init__(self, out: Path, name: str = LOCK_FILE):
        self.out = Path(out)
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / name
        self.handle = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no guard
            return
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            self.handle = None
            self._remove_if_created()
            raise DataError(f"--out {out}: another simulref eval is using this directory; "
                            "wait for it to finish or use another --out") from None

    def release(self) -> None:
        if self.handle is not None:
            # Nothing but locks there (ours, other ranks'): the run wrote nothing. Ours
            # goes while still held, so no other eval can have taken it meanwhile.
            if all(_LOCK_NAME.fullmatch(p.name) for p in self.out.iterdir()):
                try:
                    self.path.unlink(missing_ok=True)
                except OSError:  # an open file cannot be removed everywhere
                    pass
            self.handle.close()  # closing drops the flock
            self.handle = None
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self.created:
            try:
                self.out.rmdir()  # only when empty: another rank's lock may still be there
            except OSError:
                pass

    def __enter__(self) -> OutDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_name(rank: int) -> str:
    """The lock file of rank ``rank`` (0: a single process)."""
    return LOCK_FILE if rank == 0 else f".rank{rank}.lock"


def lock_out_dir(out: Path, rank: int = 0) -> OutDirLock:
    """:class:`OutDirLock` on ``out`` for rank ``rank`` (0: a single process); DataError
    when another eval holds it."""
    return OutDirLock(out, lock_name(rank))


# --- scores ------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(spec: RunSpec, pairs: Sequence[Pair], records: Sequence[Mapping], *,
              word_duration: float = 0.4) -> dict:
    """Corpus scores of one run from its per-sentence records (sentence order).

    Latency is averaged over sentences with at least one target word (SimulEval skips
    empty hypotheses too); ``empty_hypotheses`` counts the others. The computation-aware
    ``*_CA`` scores take the source as arriving one word per ``word_duration`` seconds."""
    from simulref import metrics, quality
    from simulref.trace import Trace

    by_index = {r["index"]: r for r in records}
    indices = [i for i in range(len(pairs)) if i in by_index]
    traces = [Trace.from_jsonl(by_index[i]["trace"]) for i in indices]
    references = [pairs[i].reference for i in indices]
    hypotheses = [quality.clean_hypothesis(t.target_text) for t in traces]

    latency_ref: dict[str, list[float]] = {}
    latency_hyp: dict[str, list[float]] = {}
    empty = 0
    schedules = []  # (delays, |X|, |Y|) per sentence with output, for the degeneracy test
    for trace, reference in zip(traces, references, strict=True):
        if not metrics.hypothesis_delays(trace):
            empty += 1
            continue
        schedules.append(([d for d, _ in metrics.hypothesis_delays(trace)],
                          len(trace.source_words), len(reference.split())))
        scores = metrics.latency_scores(trace, len(reference.split()),
                                        word_duration=word_duration)
        for key, value in scores.items():
            latency_ref.setdefault(key, []).append(value)
        for key, value in metrics.latency_scores(trace, None).items():
            latency_hyp.setdefault(key, []).append(value)

    tokens = sum(by_index[i]["generated_tokens"] for i in indices)
    # A batched sentence's own span overlaps the others': its share of the batch's
    # forwards is what adds up to the time spent (one at a time, the two are the same).
    seconds = sum(by_index[i].get("compute_seconds", by_index[i]["seconds"]) for i in indices)
    return {
        "run": spec.name,
        "layout": spec.layout,
        "k": spec.k,
        "policy": "read-all" if spec.offline else spec.policy or f"wait-{spec.k}",
        "family": spec.family,
        "sentences": len(indices),
        "empty_hypotheses": empty,
        "bleu": quality.corpus_bleu(hypotheses, references) if indices else float("nan"),
        "chrf": quality.corpus_chrf(hypotheses, references) if indices else float("nan"),
        "latency_reference_length": {k: _mean(v) for k, v in latency_ref.items()},
        "latency_hypothesis_length": {k: _mean(v) for k, v in latency_hyp.items()},
        # OmniSTEval's SWF, EFSW, DSPTV and "likely degenerate" flag (|Y| = reference).
        "degeneracy": metrics.degeneracy(schedules),
        "word_duration": word_duration,
        "generated_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
        "finish_reasons": _count(t.finish_reason for t in traces),
        "traces": spec.traces_file,
    }


def _count(items: Iterable) -> dict:
    out: dict = {}
    for item in items:
        out[str(item)] = out.get(str(item), 0) + 1
    return dict(sorted(out.items()))


# --- the loop ----------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Everything one ``simulref eval`` invocation needs, model included.

    ``config`` holds the decode options every run shares (its ``system`` is
    ``settings["system"]``); each run sets its own k and layout on it."""

    model: object
    tokenizer: object
    pairs: list[Pair]
    specs: list[RunSpec]
    out: Path
    settings: dict
    config: DecodeConfig | None = None
    word_duration: float = 0.4
    batch_size: int = 1
    on_batch: Callable | None = None  # simulref.batch's on_forward hook (benchmarks)
    # Over several ranks (simulref.distributed): whose progress files this process
    # appends to, and the (run name, sentence) items it decodes (None: all of them).
    rank: int = 0
    share: frozenset | None = None

    def run_config(self, spec: RunSpec) -> DecodeConfig:
        """The decode options of one run."""
        from simulref.policy import ReadAll

        base = DecodeConfig.of(self.config, system=self.settings["system"],
                               layout=spec.layout)
        if spec.offline:
            return DecodeConfig.of(base, policy=ReadAll())
        if spec.policy is not None:
            from simulref.policy import parse_policy

            return DecodeConfig.of(base, policy=parse_policy(spec.policy))
        return DecodeConfig.of(base, k=spec.k)

    def translate(self, spec: RunSpec, source: str):
        from simulref import decoder

        trace = decoder.translate(self.model, self.tokenizer, source, self.run_config(spec),
                                  model_id=self.settings.get("model"))
        return self.recorded(trace)

    def recorded(self, trace):
        """``trace`` as the results record it (with the LoRA adapter, if any)."""
        adapter = self.settings.get("adapter")
        if adapter is None:
            return trace
        # The decoder knows the model, not how it was made: record the LoRA adapter too.
        extra = {**dict(trace.settings.extra), "adapter": adapter}
        settings = dataclasses.replace(trace.settings, extra=extra)
        return dataclasses.replace(trace, settings=settings)

    def pending(self, spec: RunSpec) -> list[int]:
        """Sentences of ``spec`` in none of its progress files (and in ``share``, if set)."""
        done = {r["index"] for r in run_records(self.out, spec, repair=self.rank)}
        return [i for i in range(len(self.pairs)) if i not in done
                and (self.share is None or (spec.name, i) in self.share)]

    def run_sentence(self, spec: RunSpec, index: int) -> dict:
        start = time.monotonic()
        trace = self.translate(spec, self.pairs[index].source)
        seconds = time.monotonic() - start
        return self.store(spec, index, trace, start, seconds, seconds)

    def store(self, spec: RunSpec, index: int, trace, start: float, seconds: float,
              compute_seconds: float) -> dict:
        """Append a finished sentence's record to its run's progress file."""
        trace = rebase_times(trace, start)
        record = {
            "index": index,
            "seconds": seconds,
            "compute_seconds": compute_seconds,
            "generated_tokens": generated_tokens(trace),
            "trace": trace.to_jsonl(),
        }
        append_record(self.out / spec.rank_progress_file(self.rank), record)
        return record

    def finish_run(self, spec: RunSpec) -> dict:
        """Rewrite the run's traces file in sentence order and return its scores."""
        records = run_records(self.out, spec)
        by_index = {r["index"]: r for r in records}
        # Each record holds its trace as JSON Lines text; concatenated in sentence order
        # they make a traces file that simulref.trace.read_traces reads.
        text = "".join(by_index[i]["trace"] for i in range(len(self.pairs)) if i in by_index)
        write_atomic(self.out / spec.traces_file, text)
        return summarize(spec, self.pairs, records, word_duration=self.word_duration)

    def run(self, on_progress: Callable[[RunSpec, int, int], None] | None = None) -> list[dict]:
        """Decode every pending sentence of every run; ``on_progress(spec, done, total)``
        is called before the first and after each sentence (with ``batch_size`` > 1,
        ``spec`` is None: every run's sentences share the batch, so progress is one
        count over all of them)."""
        wrote = check_out_dir(self.out, self.settings)
        try:
            if self.batch_size > 1:
                return self._run_batched(on_progress)
            summaries = []
            for spec in self.specs:
                self.decode_run(spec, on_progress)
                summaries.append(self.finish_run(spec))
                write_results(self.out, self.settings, summaries)
            return summaries
        except BaseException:
            if wrote:
                forget_settings_if_nothing_stored(self.out)
            raise

    def decode_run(self, spec: RunSpec, on_progress=None) -> None:
        """Decode and store the pending sentences of one run, one at a time (progress
        counts the run's sentences, those of ``share`` when set); writes no run file."""
        todo = self.pending(spec)
        total = (len(self.pairs) if self.share is None
                 else sum(name == spec.name for name, _ in self.share))
        done = total - len(todo)
        if on_progress:
            on_progress(spec, done, total)
        for index in todo:
            self.run_sentence(spec, index)
            done += 1
            if on_progress:
                on_progress(spec, done, total)


    def _run_batched(self, on_progress) -> list[dict]:
        """Every pending (run, sentence) item in one continuous batch (simulref.batch):
        each record is appended when its sentence ends, so a killed run loses only the
        sentences in flight; the runs' files are written once all are done."""
        self.decode_batched(on_progress)
        return self.finish()

    def decode_batched(self, on_progress) -> None:
        """Decode and store the pending items of :meth:`_run_batched` (progress: one count
        over all runs, of ``share`` when set); writes no run file."""
        from simulref.batch import Finished, Item, decode_items

        items = [Item((n, index), self.pairs[index].source, self.run_config(spec))
                 for n, spec in enumerate(self.specs) for index in self.pending(spec)]
        total = len(self.specs) * len(self.pairs) if self.share is None else len(self.share)
        done = total - len(items)
        if on_progress:
            on_progress(None, done, total)
        for result in decode_items(self.model, self.tokenizer, items,
                                   batch_size=self.batch_size,
                                   model_id=self.settings.get("model"),
                                   on_forward=self.on_batch):
            if not isinstance(result, Finished):
                continue
            n, index = result.key
            self.store(self.specs[n], index, self.recorded(result.trace), result.started,
                       result.finished - result.started, result.compute_seconds)
            done += 1
            if on_progress:
                on_progress(None, done, total)

    def finish(self) -> list[dict]:
        """Every run's traces file and scores, then ``results.json``."""
        summaries = []
        for spec in self.specs:
            summaries.append(self.finish_run(spec))
            write_results(self.out, self.settings, summaries)
        return summaries


def rebase_times(trace, t0: float):
    """``trace`` with event times counted from ``t0`` (the decoder stamps
    ``time.monotonic()``; the computation-aware metrics count from the stream's start)."""
    from dataclasses import replace

    return replace(trace, events=tuple(replace(e, t=max(0.0, e.t - t0)) for e in trace.events))


def generated_tokens(trace) -> int:
    """Target tokens the model generated: those of the words written and of blank runs;
    for LocalAgreement, every hypothesis's tokens after what was committed before it
    (re-translation generates them again at each update, committed or not)."""
    from simulref.trace import BlankRun, Hypothesis, Write

    if any(isinstance(e, Hypothesis) for e in trace.events):
        total, committed = 0, 0
        for e in trace.events:
            if isinstance(e, Hypothesis):
                total += len(e.token_ids) - committed
            elif isinstance(e, Write):
                committed += len(e.token_ids)
        return total
    return sum(len(e.token_ids) for e in trace.events if isinstance(e, (Write, BlankRun)))


def _json_safe(value):
    # NaN (a score of zero sentences) is not JSON; null is.
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(out: Path, settings: Mapping, summaries: Sequence[Mapping]) -> Path:
    path = out / "results.json"
    payload = _json_safe({"settings": dict(settings), "runs": list(summaries)})
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


# --- reporting ---------------------------------------------------------------------------


def run_trace(out: Path, spec: RunSpec, index: int):
    """The stored trace of sentence ``index`` in run ``spec``, or None."""
    from simulref.trace import Trace

    for record in run_records(out, spec):
        if record["index"] == index:
            return Trace.from_jsonl(record["trace"])
    return None


def quality_latency_curves(summaries: Sequence[Mapping], latency: str = "AL"):
    """({curve: [(latency, BLEU, label), ...]}, offline (latency, BLEU) or None). A curve
    per layout for wait-k (label: k) and per layout and family for the other policies
    ("group confidence"; label: the parameter, e.g. "0.6"); beside those, wait-k's curve
    is "group wait-k", alone just "group"."""
    curves: dict[str, list[tuple[float, float, int | str]]] = {}
    offline = None
    for s in summaries:
        point = (s["latency_reference_length"].get(latency, float("nan")), s["bleu"])
        policy = s.get("policy") or ""
        if s["k"] is None and policy in ("", "read-all"):
            offline = point
        elif s["k"] is not None:
            curves.setdefault(s["layout"], []).append((*point, s["k"]))
        else:
            family, _, parameter = policy.partition(":")
            curves.setdefault(f"{s['layout']} {family}", []).append((*point, parameter))
    if any(" " in name for name in curves):  # other families beside wait-k: name it too
        curves = {(f"{name} wait-k" if " " not in name else name): points
                  for name, points in curves.items()}
    return curves, offline


def write_plots(job: Evaluation, summaries: Sequence[Mapping], *, sentence: int = 0) -> list:
    """quality-latency (BLEU against AL), quality-latency-ca (against the computation-
    aware AL, in seconds: what each policy's compute costs) and the staircase of one
    sentence, each as PNG and SVG."""
    from simulref.plots import plot_quality_latency, plot_staircase

    curves, offline = quality_latency_curves(summaries)
    paths = list(plot_quality_latency(curves, job.out / "quality-latency", offline=offline))
    curves, offline = quality_latency_curves(summaries, latency="AL_CA")
    paths += plot_quality_latency(curves, job.out / "quality-latency-ca", offline=offline,
                                  latency="AL_CA", unit="seconds")
    staircases = {}
    for spec in job.specs:
        trace = run_trace(job.out, spec, sentence)
        if trace is not None:
            label = ("offline" if spec.offline else f"{spec.layout} k={spec.k}" if spec.k
                     else f"{spec.layout} {spec.policy}")
            staircases[label] = (trace.delays, spec.k)
    n = len(job.pairs[sentence].source.split())
    paths += plot_staircase(staircases, n, job.out / "staircase",
                            title=f"sentence {sentence}: read/write staircase")
    return paths


TABLE_LATENCY = METRICS
TABLE_OMNISTEVAL = ("YAAL",)  # OmniSTEval's short-form latency (simulref.metrics.yaal)


def _add_columns(table, numbers: Sequence[str]) -> None:
    """The run's name (folded when the table is too wide: policy names are long), then
    number columns that never shrink below their header or a figure ("12.34")."""
    table.add_column("run", justify="left", no_wrap=True)
    for name in numbers:
        table.add_column(name, justify="right", no_wrap=True, min_width=max(len(name), 5))


# Short family names for tables, so that a policy run's row fits 80 columns.
SHORT_FAMILY = {"confidence": "conf", "local-agreement": "la"}


def _run_label(summary: Mapping) -> str:
    """A run's name in a table: a policy run as "<layout> <short policy>" ("group
    conf:0.6", "group la:2"); the others by their name."""
    k, policy = summary.get("k"), summary.get("policy") or ""
    if k is None and policy not in ("", "read-all"):
        family, _, parameters = policy.partition(":")
        return f"{summary['layout']} {SHORT_FAMILY.get(family, family)}:{parameters}"
    return summary["run"]


def results_table(summaries: Sequence[Mapping]):
    """A rich Table: one row per run, quality then latency (reference-length variants)."""
    from rich import box
    from rich.table import Table

    table = Table(title="latency in source words (|Y| = reference length); CA-AL in s",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    _add_columns(table, ("n", "BLEU", "chrF", *TABLE_LATENCY, "CA-AL", "tok/s"))
    for s in summaries:
        latency = s["latency_reference_length"]
        table.add_row(
            _run_label(s), str(s["sentences"]), _fmt(s["bleu"]), _fmt(s["chrf"]),
            *(_fmt(latency.get(name)) for name in TABLE_LATENCY),
            _fmt(latency.get("AL_CA")), _fmt(s["tokens_per_s"]),
        )
    return table


def omnisteval_table(summaries: Sequence[Mapping]):
    """A rich Table of OmniSTEval's short-form scores, one row per run: YAAL (CU, and CA
    in s) and the degeneracy test. Separate from :func:`results_table`, which already
    fills an 80-column terminal."""
    from rich import box
    from rich.table import Table

    table = Table(title="OmniSTEval: YAAL in source words, CA-YAAL in s; SWF, EFSW, DSPTV "
                  "in %; degenerate: |DSPTV| > 20",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    _add_columns(table, (*TABLE_OMNISTEVAL, "CA-YAAL", "SWF", "EFSW", "DSPTV", "degenerate"))
    for s in summaries:
        latency = s["latency_reference_length"]
        degeneracy = s.get("degeneracy") or {}  # absent from summaries stored before it
        table.add_row(
            _run_label(s), *(_fmt(latency.get(name)) for name in TABLE_OMNISTEVAL),
            _fmt(latency.get("YAAL_CA")),
            *(_fmt(degeneracy.get(name)) for name in ("SWF", "EFSW", "DSPTV")),
            _yes_no(degeneracy.get("degenerate")),
        )
    return table


def _yes_no(flag) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def _fmt(value) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.2f}"
