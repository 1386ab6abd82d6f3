"""simulref.blas: the OpenBLAS preload decision (pure), its environment, and the re-exec.

The re-exec tests preload a harmless library that every CPython on Linux already maps
(libm), so they run the same whether or not OpenBLAS is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulref import blas

DEBIAN_X86 = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

systems = st.sampled_from(["linux", "darwin", "win32", "freebsd14"])
machines = st.sampled_from(["x86_64", "aarch64", "AMD64", "arm64", "riscv64", "ppc64le"])
switches = st.sampled_from([None, "", "0", "off", "NO", "false", "1", "auto", "on",
                            "/opt/blas/libopenblas.so", "/missing/libblas.so"])
other_preloads = st.sampled_from(["", "/lib/libjemalloc.so", "/a.so:/b.so",
                                  "/usr/lib/libopenblas.so.0", DEBIAN_X86])


def environ_of(switch, preload) -> dict[str, str]:
    env = {"PATH": "/usr/bin"}
    if switch is not None:
        env[blas.ENV_SWITCH] = switch
    if preload:
        env["LD_PRELOAD"] = preload
    return env


def decide(system="linux", machine="x86_64", environ=None, exists=lambda p: True,
           mlx_loaded=False, prefix=None):
    return blas.decide(system=system, machine=machine, environ=environ or {}, exists=exists,
                       mlx_loaded=mlx_loaded, prefix=prefix)


# ---------------------------------------------------------------- MKL from the mkl wheel

VENV_MKL = "/venv/lib/libmkl_rt.so.3"


def test_the_mkl_wheel_comes_before_debian_openblas():
    d = decide(prefix="/venv", exists=lambda p: p in (VENV_MKL, DEBIAN_X86))
    assert d.library == VENV_MKL and d.warning is None


def test_an_older_mkl_soname():
    d = decide(prefix="/venv", exists=lambda p: p == "/venv/lib/libmkl_rt.so.2")
    assert d.library == "/venv/lib/libmkl_rt.so.2"


def test_without_the_mkl_wheel_debian_openblas():
    assert decide(prefix="/venv", exists=lambda p: p == DEBIAN_X86).library == DEBIAN_X86


def test_an_explicit_path_or_off_wins_over_mkl():
    assert decide(prefix="/venv", environ={blas.ENV_SWITCH: "/x/libopenblas.so"}).library == \
        "/x/libopenblas.so"
    assert decide(prefix="/venv", environ={blas.ENV_SWITCH: "0"}).library is None


def test_mkl_already_preloaded_is_not_preloaded_again():
    d = decide(prefix="/venv", environ={"LD_PRELOAD": "/other/lib/libmkl_rt.so.2"})
    assert d.library is None and "already preloaded" in d.reason
    assert blas.preloaded_openblas({"LD_PRELOAD": VENV_MKL}) == VENV_MKL


def test_which_paths_are_a_fast_blas():
    assert blas.is_mkl(VENV_MKL) and blas.is_fast_blas(VENV_MKL)
    assert not blas.is_mkl("/venv/lib/libmkl_core.so.2")  # needs libmkl_rt to be usable
    assert blas.is_fast_blas(DEBIAN_X86.replace("libblas", "libopenblas"))
    assert not blas.is_fast_blas("/lib/libm.so.6")


# ---------------------------------------------------------------- the decision


def test_linux_with_debian_openblas_preloads_it():
    d = decide(exists=lambda p: p == DEBIAN_X86)
    assert d.library == DEBIAN_X86 and DEBIAN_X86 in d.reason


def test_aarch64_looks_in_its_own_multiarch_dir():
    expected = "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3"
    assert decide(machine="aarch64").library == expected
    assert blas.debian_openblas("arm64") == expected
    assert blas.debian_openblas("riscv64") is None


@pytest.mark.parametrize("value", ["0", "off", "No", "FALSE", " 0 "])
def test_switch_off_wins(value):
    d = decide(environ={blas.ENV_SWITCH: value})
    assert d.library is None and "turned off" in d.reason


def test_missing_library_says_how_to_install_it():
    d = decide(exists=lambda p: False)
    assert d.library is None and "libopenblas0-pthread" in d.reason


def test_explicit_path():
    env = {blas.ENV_SWITCH: "/opt/blas/libopenblas.so"}
    assert decide(environ=env).library == "/opt/blas/libopenblas.so"
    d = decide(environ=env, exists=lambda p: False)
    assert d.library is None and "/opt/blas/libopenblas.so" in d.reason


def test_not_on_other_systems():
    for system in ("darwin", "win32"):
        d = decide(system=system)
        assert d.library is None and system in d.reason


def test_too_late_once_mlx_is_loaded():
    d = decide(mlx_loaded=True)
    assert d.library is None and "MLX" in d.reason


@pytest.mark.parametrize("preload", [DEBIAN_X86, "/x/libopenblas.so.0",
                                     f"/lib/libjemalloc.so:{DEBIAN_X86}"])
def test_already_preloaded(preload):
    d = decide(environ={"LD_PRELOAD": preload})
    assert d.library is None and "already preloaded" in d.reason


@given(systems, machines, switches, other_preloads, st.booleans(), st.booleans())
def test_decision_invariants(system, machine, switch, preload, exists, mlx_loaded):
    environ = environ_of(switch, preload)
    before = dict(environ)
    d = decide(system, machine, environ, lambda p: exists, mlx_loaded)
    assert environ == before  # pure: the mapping is not touched
    if d.library is None:
        return
    # A preload only ever happens on Linux, switched on, when the library exists, before
    # MLX is loaded and when no OpenBLAS is preloaded yet.
    assert system == "linux" and exists and not mlx_loaded
    assert (switch or "").strip().lower() not in blas.OFF_VALUES
    assert blas.preloaded_openblas(environ) is None
    expected = (blas.debian_openblas(machine) if (switch or "").lower() in blas.AUTO_VALUES
                else switch)
    assert d.library == expected


@given(systems, machines, switches, other_preloads)
def test_a_restart_never_restarts_again(system, machine, switch, preload):
    # The re-exec'd process sees the environment it was given: the decision there must be
    # "leave it", or the command would exec itself forever.
    environ = environ_of(switch, preload)
    d = decide(system, machine, environ)
    if d.library is not None:
        again = decide(system, machine, blas.preload_env(environ, d.library))
        assert again.library is None and "already preloaded" in again.reason


# ---------------------------------------------------------------- environment helpers


@given(other_preloads, st.sampled_from(["/x/libblas.so.3", "/y/libm.so.6"]))
def test_preload_env_puts_the_library_first_and_keeps_the_rest(preload, library):
    environ = environ_of("1", preload)
    env = blas.preload_env(environ, library)
    entries = env["LD_PRELOAD"].replace(":", " ").split()
    assert entries[0] == library
    assert entries[1:] == preload.replace(":", " ").split()
    assert {k: v for k, v in env.items() if k != "LD_PRELOAD"} == {
        k: v for k, v in environ.items() if k != "LD_PRELOAD"}
    assert environ == environ_of("1", preload)  # the input is not modified


def test_preloaded_openblas_reads_every_entry():
    assert blas.preloaded_openblas({"LD_PRELOAD": "/a.so /b/libopenblas.so.0"}) == \
        "/b/libopenblas.so.0"
    assert blas.preloaded_openblas({"LD_PRELOAD": "/a.so:/b.so"}) is None
    assert blas.preloaded_openblas({}) is None


MAPS = """\
7f00-7f01 r--p 00 08:01 1 /usr/bin/python3.11
7f00-7f01 r-xp 00 08:01 2 /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
7f00-7f01 r--p 00 08:01 3 /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so
7f00-7f01 r-xp 00 08:01 3 /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so
7f00-7f01 r-xp 00 08:01 4 /venv/numpy.libs/libscipy_openblas64_-ff651d7f.so
7f00-7f01 rw-p 00 00:00 0
7f00-7f01 rw-p 00 00:00 0 [heap]
7f00-7f01 r--p 00 08:01 5 /opt/my dir/lib x.so
"""


def test_mapped_paths_from_proc_maps():
    assert blas.mapped_paths(MAPS) == [
        "/usr/bin/python3.11",
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so",
        "/venv/numpy.libs/libscipy_openblas64_-ff651d7f.so",
        "/opt/my dir/lib x.so",
    ]
    assert [p for p in blas.mapped_paths(MAPS) if blas.is_openblas(p)] == [
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so",
    ]


def test_openblas_status_of_this_process():
    status = blas.openblas_status()
    assert set(status) == {"preloaded", "mapped", "active", "kind", "threads"}
    assert status["kind"] in (None, "mkl", "openblas")
    assert status["preloaded"] == blas.preloaded_openblas(os.environ)
    assert status["active"] is bool(status["active"])
    if status["active"]:
        assert status["mapped"]


# ---------------------------------------------------------------- the re-exec itself


def _harmless_library() -> str:
    """A library this interpreter already maps (preloading it changes nothing)."""
    if sys.platform.startswith("linux"):
        with open("/proc/self/maps") as handle:
            for path in blas.mapped_paths(handle.read()):
                if os.path.basename(path).startswith(("libm.so", "libc.so")):
                    return path
    return sys.executable  # elsewhere nothing is preloaded anyway


def _run(code: str, switch: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env[blas.ENV_SWITCH] = switch
    env["PYTHONPATH"] = REPO
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, check=True)


SHOW = "import os; print('LD_PRELOAD=' + os.environ.get('LD_PRELOAD', ''))"


def test_reexec_restarts_the_same_command_with_the_preload():
    library = _harmless_library()
    code = f"from simulref.blas import reexec_with_openblas; reexec_with_openblas(); {SHOW}"
    out = _run(code, library).stdout.splitlines()
    expected = library if sys.platform.startswith("linux") else ""
    assert out == [f"LD_PRELOAD={expected}"]  # printed once: restarted once, not twice
    assert _run(code, "0").stdout.splitlines() == ["LD_PRELOAD="]


def test_the_command_restarts_itself_but_not_a_callers_main():
    library = _harmless_library()
    expected = library if sys.platform.startswith("linux") else ""
    as_command = ("import sys; sys.argv = ['simulref', '--version']\n"
                  f"from simulref.cli import main; main(); {SHOW}")
    out = _run(as_command, library).stdout.splitlines()
    assert out == ["simulref 0.1.0", f"LD_PRELOAD={expected}"]
    as_library = f"from simulref.cli import main; main(['--version']); {SHOW}"
    assert _run(as_library, library).stdout.splitlines() == ["simulref 0.1.0", "LD_PRELOAD="]


def test_module_runs_a_command_with_the_preload():
    library = _harmless_library()
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update({blas.ENV_SWITCH: library, "PYTHONPATH": REPO})
    out = subprocess.run([sys.executable, "-m", "simulref.blas", sys.executable, "-c", SHOW],
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    expected = library if sys.platform.startswith("linux") else ""
    assert out.stdout.splitlines() == [f"LD_PRELOAD={expected}"]
    assert "simulref.blas:" in out.stderr


# ---------------------------------------------------------------- issue 14: say it once


def test_no_openblas_warns_with_the_fix_and_the_factor():
    d = decide(exists=lambda p: False)
    assert d.library is None
    assert blas.INSTALL_HINT in d.warning and "prefill ~10x" in d.warning
    assert f"{blas.ENV_SWITCH}=0 hides this" in d.warning


def test_a_bad_path_warns():
    d = decide(environ={blas.ENV_SWITCH: "/nope.so"}, exists=lambda p: False)
    assert d.library is None and d.warning.startswith(f"simulref: {blas.ENV_SWITCH}=/nope.so: "
                                                      "no such file")


@given(system=systems, machine=machines, switch=switches, preload=other_preloads,
       exists=st.booleans())
def test_a_warning_only_when_the_slow_blas_stays(system, machine, switch, preload, exists):
    d = decide(system, machine, environ_of(switch, preload), lambda p: exists)
    if d.warning is not None:
        assert d.library is None and system == "linux"
        assert (switch or "").strip().lower() not in blas.OFF_VALUES


def test_the_command_warns_once_on_a_bad_path_and_not_when_turned_off():
    code = "from simulref.blas import reexec_with_openblas; reexec_with_openblas()"
    lines = _run(code, "/nope.so").stderr.splitlines()
    if sys.platform.startswith("linux"):
        assert len(lines) == 1 and "/nope.so: no such file" in lines[0]
    assert _run(code, "0").stderr == ""


# ---------------------------------------------------------------- issue 14: the exit hang


def test_drain_waits_for_mlx_work_in_flight(monkeypatch):
    import mlx.core as mx

    calls = []
    monkeypatch.setattr(mx, "synchronize", lambda *a: calls.append(a))
    blas.drain_mlx()
    assert calls == [()]


def test_load_registers_the_drain_once(monkeypatch, tmp_path):
    from simulref import models

    registered = []
    monkeypatch.setattr(blas, "_drain_registered", False)
    monkeypatch.setattr(blas.atexit, "register", registered.append)
    for _ in range(2):
        with pytest.raises(FileNotFoundError):
            models.load(tmp_path / "absent.gguf")
    assert registered == [blas.drain_mlx]
