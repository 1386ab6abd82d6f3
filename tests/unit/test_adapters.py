"""simulref.adapters: a damaged or foreign adapter directory is one catchable
:class:`AdapterError` whose one-line message names the adapter file (issue 21, item 3)."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from simulref import finetune, models
from simulref.adapters import AdapterError, adapter_sha256, apply_adapter, read_adapter
from simulref.testing import tiny_model


@pytest.fixture
def adapter(tmp_path):
    """A LoRA adapter directory for the tiny llama (2 blocks, rank 4), untrained."""
    model = tiny_model("llama", seed=0)
    lora = finetune.LoraConfig(rank=4, num_layers=2)
    finetune.add_lora(model, lora)
    out = tmp_path / "adapter"
    out.mkdir()
    finetune.save_adapter(model, out, finetune.adapter_config(lora, {"model": "tiny-llama"}))
    return out


def one_line_error(directory, file: str, match: str) -> AdapterError:
    with pytest.raises(AdapterError, match=match) as caught:
        apply_adapter(tiny_model("llama", seed=0), directory)
    message = str(caught.value)
    assert "\n" not in message and str(directory / file) in message, message
    assert len(message) < 400, message
    return caught.value


def test_a_good_adapter_applies(adapter):
    apply_adapter(tiny_model("llama", seed=0), adapter)
    config, weights = read_adapter(adapter)
    assert config["num_layers"] == 2 and weights


@pytest.mark.parametrize("keep", [0, 7, 100, 0.5])
def test_a_truncated_or_corrupt_weights_file(adapter, keep):
    path = adapter / "adapters.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    one_line_error(adapter, "adapters.safetensors", "not a readable safetensors file")


def test_garbage_weights(adapter):
    (adapter / "adapters.safetensors").write_bytes(b"not safetensors at all" * 50)
    one_line_error(adapter, "adapters.safetensors", "not a readable safetensors file")


@pytest.mark.parametrize("text, match", [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"fine_tune_type": "lora"}', "num_layers: expected an int >= 1"),
    ('{"num_layers": "two", "lora_parameters": {"rank": 4, "scale": 1, "dropout": 0}}',
     "num_layers: expected an int >= 1"),
    ('{"num_layers": 2}', "lora_parameters: expected an object"),
    ('{"num_layers": 2, "lora_parameters": {"rank": 4, "dropout": 0}}',
     "lora_parameters.scale: expected a number"),
    ('{"num_layers": 2, "lora_parameters": {"rank": 0, "scale": 1, "dropout": 0}}',
     "lora_parameters.rank: expected an int >= 1"),
    ('{"num_layers": 2, "fine_tune_type": "qlora", "lora_parameters": {}}',
     "fine_tune_type: expected one of"),
])
def test_a_bad_config_blames_the_adapter(adapter, text, match):
    (adapter / "adapter_config.json").write_text(text)
    one_line_error(adapter, "adapter_config.json", match)


def test_an_adapter_for_another_base_model_is_one_line(adapter):
    # The weights of another model's adapter: same names, other shapes (as from a
    # model with a wider hidden size), plus one tensor this model has no place for.
    weights = mx.load(str(adapter / "adapters.safetensors"))
    foreign = {name: mx.zeros((w.shape[0] * 2, w.shape[1])) for name, w in weights.items()}
    foreign["model.layers.9.self_attn.q_proj.lora_a"] = mx.zeros((64, 4))
    mx.save_safetensors(str(adapter / "adapters.safetensors"), foreign)
    error = one_line_error(adapter, "adapters.safetensors",
                           r"does not fit this model: \d+ of its \d+ tensors")
    assert "trained on 'tiny-llama'" in str(error)


def test_models_load_checks_the_adapter_before_the_model_loads(adapter, monkeypatch):
    (adapter / "adapter_config.json").write_text("{not json")

    def no_load(*args):
        raise AssertionError("the model loaded before the adapter was checked")

    monkeypatch.setattr(models, "_load", no_load)
    with pytest.raises(AdapterError, match="adapter_config.json: not JSON"):
        models.load("smollm2-135m", "float32", adapter=adapter)


def test_the_hash_covers_both_files(adapter):
    before = adapter_sha256(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_parameters"]["scale"] = 1.0
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert adapter_sha256(adapter) != before
