"""Benchmarks: options, the models, the machine, and the results files.

``pytest tests/bench`` prints a results table at the end; ``--bench-out DIR`` also writes
``DIR/results.json`` and ``DIR/results.md`` (``nox -s bench`` passes ``--bench-out bench``).
Each test stores its figures with ``record(...)``, which also puts them, with the device,
dtype and BLAS, in pytest-benchmark's ``extra_info``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import bench_report
import pytest

# Presets and how many sentences of the bundled postgres-en-fr set each one translates on
# top of the fixed sentences (the larger model is ~4x slower per token on a CPU).
DEFAULT_SENTENCES = {"smollm2-135m": 10, "qwen2.5-coder-0.5b": 2}


def pytest_addoption(parser):
    group = parser.getgroup("simulref benchmarks")
    group.addoption("--bench-out", default=None, metavar="DIR",
                    help="write DIR/results.json and DIR/results.md at the end")
    group.addoption("--bench-models", default=",".join(DEFAULT_SENTENCES), metavar="A,B",
                    help="presets to measure (default: %(default)s)")
    group.addoption("--bench-sentences", action="append", default=[], metavar="MODEL=N",
                    help="postgres-en-fr sentences for MODEL besides the fixed ones "
                         f"(default: {DEFAULT_SENTENCES})")
    group.addoption("--bench-lengths", default="10,20,40,80", metavar="N,N,...",
                    help="source lengths (words) of the scaling benchmark")
    group.addoption("--bench-block", type=int, default=8, metavar="TOKENS",
                    help="tokens per lockstep block (default: 8)")


def _sentence_counts(config) -> dict[str, int]:
    counts = dict(DEFAULT_SENTENCES)
    for item in config.getoption("--bench-sentences"):
        name, _, value = item.partition("=")
        if not value.isdigit():
            raise pytest.UsageError(f"--bench-sentences: expected MODEL=N, got {item!r}")
        counts[name] = int(value)
    return counts


def pytest_generate_tests(metafunc):
    if "preset" in metafunc.fixturenames:
        models = [m for m in metafunc.config.getoption("--bench-models").split(",") if m]
        metafunc.parametrize("preset", models, scope="session")


@pytest.fixture(scope="session")
def sentence_count(request) -> dict[str, int]:
    return _sentence_counts(request.config)


@pytest.fixture(scope="session")
def lengths(request) -> list[int]:
    text = request.config.getoption("--bench-lengths")
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise pytest.UsageError(f"--bench-lengths: expected N,N,..., got {text!r}") from None
    if len(values) < 2 or min(values) < 4:
        raise pytest.UsageError(f"--bench-lengths: expected 2+ lengths >= 4, got {text!r}")
    return values


@pytest.fixture(scope="session")
def block(request) -> int:
    value = request.config.getoption("--bench-block")
    if value < 1:
        raise pytest.UsageError(f"--bench-block: expected an int >= 1, got {value}")
    return value


# ---------------------------------------------------------------- models and machine

_MODELS: dict[str, tuple] = {}


def model_dtype(model) -> str:
    """The dtypes of a model's weights, e.g. ``float32`` or ``uint32+float32`` (quantized)."""
    from mlx.utils import tree_flatten

    names = sorted({str(v.dtype).removeprefix("mlx.core.") for _, v in
                    tree_flatten(model.parameters())})
    return "+".join(names)


@pytest.fixture(scope="session")
def loaded():
    """``loaded(preset) -> (model, tokenizer, info)``, each preset loaded once (with the
    device's default dtype, as the CLI does) and warmed up."""
    def get(preset: str):
        if preset not in _MODELS:
            from mlx_lm import stream_generate

            from simulref import load
            from simulref.models import default_dtype

            t0 = time.perf_counter()
            model, tokenizer = load(preset)
            seconds = time.perf_counter() - t0
            for _ in stream_generate(model, tokenizer, "Hello", max_tokens=4):
                pass  # first calls allocate; keep them out of the measurements
            info = {"model": preset, "dtype": default_dtype(),
                    "weights": model_dtype(model), "load_s": round(seconds, 2)}
            _MODELS[preset] = (model, tokenizer, info)
        return _MODELS[preset]

    return get


def machine_info() -> dict:
    import mlx.core as mx
    import mlx_lm

    from simulref.blas import openblas_status

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "device": str(mx.default_device()),
        "openblas": openblas_status(),
        "load_average": load,
    }


class Recorder:
    """The results of one session, written at its end."""

    def __init__(self):
        self.started = time.time()
        self.machine: dict | None = None
        self.results: list[dict] = []

    def environment(self) -> dict:
        if self.machine is None:
            self.machine = machine_info()
        return self.machine

    def document(self, config) -> dict:
        machine = dict(self.environment())
        machine["load_average_start"] = machine.pop("load_average")
        try:
            machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            machine["load_average_end"] = None
        return {
            "schema": "simulref.bench/1",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "runtime_s": round(time.time() - self.started, 1),
            "machine": machine,
            "results": self.results,
        }


def pytest_configure(config):
    config._simulref_bench = Recorder()


@pytest.fixture
def record(request, benchmark):
    """``record(section, metrics, **labels)``: keep a result for the results files and
    put it, with the device, dtype and BLAS, in the benchmark's extra_info."""
    recorder: Recorder = request.config._simulref_bench
    env = recorder.environment()

    def add(section: str, metrics: dict, **labels) -> dict:
        result = {"section": section, "test": request.node.nodeid, **labels,
                  "device": env["device"], "mlx": env["mlx"],
                  "openblas_active": env["openblas"]["active"],
                  "openblas_threads": env["openblas"]["threads"], "metrics": metrics}
        recorder.results.append(result)
        benchmark.extra_info.update({k: v for k, v in result.items() if k != "metrics"})
        benchmark.extra_info["metrics"] = metrics
        return result

    return add


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def pytest_sessionfinish(session, exitstatus):
    recorder: Recorder | None = getattr(session.config, "_simulref_bench", None)
    if recorder is None or not recorder.results:
        return
    document = recorder.document(session.config)
    session.config._simulref_markdown = bench_report.markdown(document)
    out = session.config.getoption("--bench-out")
    if out:
        out = Path(out)
        _write_atomic(out / "results.json", json.dumps(document, indent=1, sort_keys=True)
                      + "\n")
        _write_atomic(out / "results.md", session.config._simulref_markdown)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    text = getattr(config, "_simulref_markdown", None)
    if text:
        terminalreporter.write_sep("=", "simulref benchmark results")
        terminalreporter.write_line(text)
