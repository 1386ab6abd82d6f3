"""Sessions: tests (unit + golden), golden, bench, exit_hang, lint, demo.

Every session builds its own virtualenv from scratch (nox's default), so what passes
here passes on a fresh machine.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = False

PYTHON = os.environ.get("SIMULREF_NOX_PYTHON", "3.11")
DEMO_SENTENCE = "The weather is nice today, so we are going to walk in the park."


# SimulEval 1.1.4 declares pytest-flake8 (whose plugin stops pytest 9 from starting) and
# audio packages; its scorers and text agents need only these.
SIMULEVAL = ["simuleval==1.1.4"]
SIMULEVAL_NEEDS = ["pandas", "pyyaml", "textgrid", "requests", "tqdm"]
# OmniSTEval, pinned: the cross-checks hold our YAAL, degeneracy figures and long-form
# resegmentation to its code. Its mosestokenizer is only for its --lang option.
OMNISTEVAL = ["omnisteval==0.1.10"]
OMNISTEVAL_NEEDS = ["pyyaml", "sacrebleu"]


def _install(session: nox.Session, extras: str = "test") -> None:
    session.install("--upgrade", "pip")
    session.install("-e", f".[{extras}]")


def _install_simuleval(session: nox.Session) -> None:
    session.install("--no-deps", *SIMULEVAL)
    session.install(*SIMULEVAL_NEEDS)


def _install_omnisteval(session: nox.Session) -> None:
    session.install("--no-deps", *OMNISTEVAL)
    session.install(*OMNISTEVAL_NEEDS)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Unit and golden tests (the golden ones download the small preset once)."""
    _install(session)
    _install_simuleval(session)
    _install_omnisteval(session)
    session.run(
        "pytest", "tests/unit", "tests/golden", "--hypothesis-profile=ci", *session.posargs,
        env={"PYTHONHASHSEED": "0"},
    )


@nox.session(python=PYTHON)
def golden(session: nox.Session) -> None:
    """Only the golden read/write traces; pass --snapshot-update to accept new ones."""
    _install(session)
    session.run("pytest", "tests/golden", *session.posargs)


def _openblas_env() -> dict[str, str]:
    """MLX's Linux CPU wheel with OpenBLAS preloaded when installed (simulref/blas.py);
    SIMULREF_OPENBLAS=0 turns it off."""
    return {"SIMULREF_OPENBLAS": os.environ.get("SIMULREF_OPENBLAS", "auto")}


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks (ratios against baselines measured in the same run); writes
    bench/results.json and bench/results.md (see docs/performance.md). The bench extra
    brings torch (the side-by-side call against transformers) and MKL (a BLAS the bench
    compares with OpenBLAS). Where pip would take torch's CUDA build, install the CPU one
    into the session first: pip install torch==2.13.0 --index-url
    https://download.pytorch.org/whl/cpu."""
    _install(session, "test,bench")
    session.run("python", "-m", "simulref.blas", "pytest", "tests/bench", "--bench-out", "bench",
                *session.posargs, env=_openblas_env())


@nox.session(python=PYTHON)
def exit_hang(session: nox.Session) -> None:
    """Count hangs at exit (issue 14): N runs (default 300; `-- 1000` for more) of a cheap
    probe of the exit path, then of `simulref translate` on the small preset, each under
    a per-run timeout. Fails when any run hung. Minutes: not part of `tests`."""
    _install(session)
    runs = session.posargs[0] if session.posargs else "300"
    count = ["python", "tests/bench/exit_hang.py", "--runs", runs]
    session.run(*count, "--timeout", "10", "--", "python", "-m", "simulref.blas", "python",
                "tests/bench/exit_hang_probe.py", env=_openblas_env())
    session.run(*count, "--timeout", "60", "--", "simulref", "translate", "Hello world.",
                "-k", "2", "--model", "smollm2-135m", env=_openblas_env())


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "simulref", "tests", "noxfile.py")


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Stream a translation of an example sentence with the default model."""
    _install(session, extras="test")
    args = session.posargs or [DEMO_SENTENCE, "-k", "3", "--trace"]
    session.run("simulref", "translate", *args, env=_openblas_env())
