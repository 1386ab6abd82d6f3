"""A fast BLAS for MLX's Linux CPU wheel (MKL or OpenBLAS): detect it, and re-exec a
command with it preloaded.

MLX's Linux CPU wheel links a reference BLAS (``mlx_cpu.libs/libblas-*.so``): correct,
single-threaded and unblocked. Preloading a real BLAS interposes its ``cblas_sgemm`` on
MLX's float32 matmuls. Measured on a 2-core x86_64 machine (docs/performance.md):
Debian's OpenBLAS (``libopenblas0-pthread``) makes SmolLM2-135M prefill ~10-30x and decode
~2x faster than the reference BLAS; MKL (the ``mkl`` wheel, ``pip install mkl``, x86_64)
makes the decode step about 2x faster again, because Debian 12's OpenBLAS 0.3.21 runs a
one-row product (every decode step's matmuls) as a general GEMM. It changes nothing on
Metal or CUDA (no BLAS on the GPU path) nor for the quantized, float16 and bfloat16 CPU
kernels (MLX's own code).

``LD_PRELOAD`` only works when the process starts, so :func:`reexec_with_openblas` (called
by the ``simulref`` command before anything imports MLX) replaces the process with the same
command line and ``LD_PRELOAD`` set. ``python -m simulref.blas CMD ARGS...`` runs any
command the same way (the nox bench session runs pytest through it).

Environment:

``SIMULREF_OPENBLAS``
    ``0`` (or ``off``/``no``/``false``): never preload. Unset, empty, ``1``, ``auto``:
    preload MKL when the ``mkl`` wheel is installed in this Python environment, else the
    Debian OpenBLAS when it is installed. A path: preload that library.

Threads: ``MKL_NUM_THREADS`` for MKL, ``OPENBLAS_NUM_THREADS`` for OpenBLAS.

The decision is the pure function :func:`decide`; this module imports nothing heavy.

Exit: :func:`register_drain_at_exit` (``simulref.load`` calls it) makes the process wait
for MLX work still in flight before it exits; see :func:`drain_mlx` for why.
"""

from __future__ import annotations

import atexit
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

ENV_SWITCH = "SIMULREF_OPENBLAS"
OFF_VALUES = frozenset({"0", "off", "no", "false"})
AUTO_VALUES = frozenset({"", "1", "on", "yes", "true", "auto"})
# Debian/Ubuntu multiarch directory per machine name (platform.machine()).
MULTIARCH = {"x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu",
             "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}


def debian_openblas(machine: str) -> str | None:
    """Where ``libopenblas0-pthread`` puts its BLAS on ``machine``; None for unknown ones."""
    arch = MULTIARCH.get(machine.lower())
    return None if arch is None else f"/usr/lib/{arch}/openblas-pthread/libblas.so.3"


def _preload_entries(value: str) -> list[str]:
    # ld.so takes LD_PRELOAD entries separated by spaces and/or colons.
    return [e for e in value.replace(":", " ").split() if e]


# MKL's single dynamic library as the ``mkl`` wheel installs it (``pip install mkl``,
# x86_64 only), newest soname first. It exports the CBLAS symbols MLX's CPU backend calls.
MKL_SONAMES = ("libmkl_rt.so.3", "libmkl_rt.so.2")


def python_mkl(prefix: str | None, exists: Callable[[str], bool]) -> str | None:
    """MKL from the ``mkl`` wheel in the Python environment at ``prefix``, if installed."""
    if not prefix:
        return None
    for name in MKL_SONAMES:
        path = os.path.join(prefix, "lib", name)
        if exists(path):
            return path
    return None


def preloaded_openblas(environ: Mapping[str, str]) -> str | None:
    """The ``LD_PRELOAD`` entry that is a fast BLAS (OpenBLAS or MKL), if any (by path)."""
    for entry in _preload_entries(environ.get("LD_PRELOAD", "")):
        if is_fast_blas(entry):
            return entry
    return None


# Measured on a 2-core x86_64 machine, float32 SmolLM2-135M (README, "BLAS on the CPU").
SLOWDOWN = "float32 prefill ~10x and decode ~1.6x slower"
INSTALL_HINT = "apt-get install libopenblas0-pthread, or pip install mkl"


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` concluded: ``library`` to preload (None: leave the process as
    it is), ``reason``, one line for humans, and ``warning``: one line worth telling the
    user unasked (the slow reference BLAS will be used and something can be done)."""

    library: str | None
    reason: str
    warning: str | None = None


def decide(*, system: str, machine: str, environ: Mapping[str, str],
           exists: Callable[[str], bool], mlx_loaded: bool = False,
           prefix: str | None = None) -> Decision:
    """Whether to (re)start with a fast BLAS preloaded, from facts only (no side effects).

    ``system``: ``sys.platform``; ``machine``: ``platform.machine()``; ``environ``: the
    environment; ``exists``: whether a file exists; ``mlx_loaded``: whether MLX is already
    imported in this process (then a preload would come too late, and a re-exec would
    restart whatever program imported it, so it is refused); ``prefix``: the Python
    environment (``sys.prefix``) where the ``mkl`` wheel may be installed.

    Automatic choice: MKL from the ``mkl`` wheel when it is installed, else Debian's
    OpenBLAS. MKL first because Debian 12's OpenBLAS (0.3.21) runs MLX's one-row matmuls
    (every decode step) as a general GEMM: MKL's decode step is about twice as fast on
    the same machine (docs/performance.md, "BLAS on the CPU").
    """
    setting = environ.get(ENV_SWITCH, "").strip()
    if setting.lower() in OFF_VALUES:
        return Decision(None, f"{ENV_SWITCH}={setting}: turned off")
    if not system.startswith("linux"):
        return Decision(None, f"{system}: LD_PRELOAD applies to Linux only")
    auto = setting.lower() in AUTO_VALUES
    library = ((python_mkl(prefix, exists) or debian_openblas(machine)) if auto
               else setting)
    if library is None:
        return Decision(None, f"no known OpenBLAS location for machine {machine!r}")
    # Already there (this is also what stops a re-exec from looping).
    entries = _preload_entries(environ.get("LD_PRELOAD", ""))
    already = library if library in entries else preloaded_openblas(environ)
    if already is not None:
        return Decision(None, f"already preloaded: {already}")
    if mlx_loaded:
        return Decision(None, "MLX is already loaded in this process: too late to preload")
    if not exists(library):
        if auto:
            return Decision(
                None, f"{library}: not installed (Debian/Ubuntu: {INSTALL_HINT})",
                f"simulref: no OpenBLAS ({library}): MLX's reference BLAS makes {SLOWDOWN}; "
                f"Debian/Ubuntu: {INSTALL_HINT} ({ENV_SWITCH}=0 hides this)")
        return Decision(
            None, f"{ENV_SWITCH}={setting}: no such file",
            f"simulref: {ENV_SWITCH}={setting}: no such file; running with MLX's reference "
            f"BLAS ({SLOWDOWN}); set {ENV_SWITCH} to an OpenBLAS library, or 0")
    return Decision(library, f"preloading {library}")


def preload_env(environ: Mapping[str, str], library: str) -> dict[str, str]:
    """A copy of ``environ`` with ``library`` first in ``LD_PRELOAD`` (others kept)."""
    env = dict(environ)
    rest = env.get("LD_PRELOAD", "").strip()
    env["LD_PRELOAD"] = f"{library} {rest}" if rest else library
    return env


def current_decision() -> Decision:
    """:func:`decide` for this process."""
    return decide(system=sys.platform, machine=platform.machine(), environ=os.environ,
                  exists=os.path.isfile, mlx_loaded="mlx.core" in sys.modules,
                  prefix=sys.prefix)


def mapped_paths(maps: str) -> list[str]:
    """The files mapped into a process, in first-seen order, from a ``/proc/<pid>/maps``
    text (a line is ``address perms offset dev inode [path]``)."""
    paths: dict[str, None] = {}
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            paths.setdefault(fields[5].strip())
    return list(paths)


def is_openblas(path: str) -> bool:
    """Whether a library path looks like OpenBLAS (numpy's bundled ``scipy_openblas``, with
    renamed symbols, serves numpy only and does not count)."""
    lowered = path.lower()
    return "openblas" in lowered and "scipy_openblas" not in lowered


def is_mkl(path: str) -> bool:
    """Whether a library path is MKL's single dynamic library (``libmkl_rt``)."""
    return os.path.basename(path).startswith("libmkl_rt.")


def is_fast_blas(path: str) -> bool:
    return is_openblas(path) or is_mkl(path)


def openblas_status() -> dict:
    """What this process runs with: ``{"preloaded": LD_PRELOAD entry or None, "mapped":
    [OpenBLAS paths mapped], "active": bool, "threads": OPENBLAS_NUM_THREADS or None}``.
    ``active``: the OpenBLAS named in LD_PRELOAD is mapped into the process, so its
    symbols come first for MLX's BLAS calls."""
    preloaded = preloaded_openblas(os.environ)
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as handle:
            mapped = mapped_paths(handle.read())
    except OSError:
        mapped = []
    real = {os.path.realpath(p) for p in mapped}
    return {"preloaded": preloaded, "mapped": [p for p in mapped if is_fast_blas(p)],
            "active": bool(preloaded) and os.path.realpath(preloaded) in real,
            "kind": None if preloaded is None else ("mkl" if is_mkl(preloaded)
                                                    else "openblas"),
            "threads": os.environ.get("MKL_NUM_THREADS" if preloaded and is_mkl(preloaded)
                                      else "OPENBLAS_NUM_THREADS")}


def _restart_argv() -> list[str] | None:
    """The command line that started this interpreter, to run it again (None: unknown)."""
    argv = getattr(sys, "orig_argv", None)
    if not sys.executable or not argv:
        return None
    return [sys.executable, *argv[1:]]


def reexec_with_openblas() -> None:
    """Replace this process by the same command with OpenBLAS preloaded, when
    :func:`current_decision` says so; otherwise return and change nothing. Call it first
    thing in a program's entry point, before MLX is imported."""
    decision = current_decision()
    argv = _restart_argv()
    if decision.warning is not None:
        # Once per run: a process that re-executes has found its library, so warns not.
        print(decision.warning, file=sys.stderr, flush=True)
    if decision.library is None or argv is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, preload_env(os.environ, decision.library))
    except OSError:
        return  # could not restart: go on with the wheel's BLAS


def drain_mlx() -> None:
    """Wait for MLX work still in flight (an ``mx.async_eval`` nobody waited for), if MLX
    is loaded.

    Why: a process that exits while MLX's CPU thread is inside an OpenBLAS call races
    OpenBLAS's exit-time shutdown (``gotoblas_quit`` -> ``blas_thread_shutdown_``, an ELF
    destructor): shutdown marks each worker's queue slot "exit", the worker still running
    MLX's call then clears the slot and goes back to sleep, and the main thread waits in
    ``pthread_join`` forever. gdb on a hung run shows exactly that (main thread in
    ``pthread_join`` under ``gotoblas_quit``, the worker in ``pthread_cond_wait``). The
    decoder's last forward is such work: a speculative next step, ``async_eval``'d and
    never needed once the translation ends. Measured with ``tests/bench/exit_hang.py``
    (docs/performance.md): a process that exits with a matmul chain in flight hung in 23
    of 40 runs before, in none after."""
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return
    try:
        mx.synchronize()
    except Exception:  # noqa: BLE001 - never let the exit path raise
        pass


_drain_registered = False


def register_drain_at_exit() -> None:
    """Run :func:`drain_mlx` at interpreter exit (once, however often called). Python's
    atexit handlers run before the C library's destructors, so the drain comes first."""
    global _drain_registered
    if not _drain_registered:
        atexit.register(drain_mlx)
        _drain_registered = True


def run_with_openblas(command: Sequence[str]) -> int:
    """Exec ``command`` (searched on PATH) with OpenBLAS preloaded when
    :func:`current_decision` says so; prints the decision on stderr."""
    if not command:
        print("usage: python -m simulref.blas COMMAND [ARGS...]", file=sys.stderr)
        return 2
    decision = current_decision()
    print(f"simulref.blas: {decision.reason}", file=sys.stderr, flush=True)
    env = dict(os.environ) if decision.library is None else preload_env(
        os.environ, decision.library)
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as error:
        print(f"simulref.blas: cannot run {command[0]}: {error.strerror or error}",
              file=sys.stderr)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(run_with_openblas(sys.argv[1:]))
