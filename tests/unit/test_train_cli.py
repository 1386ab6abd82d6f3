"""``simulref train`` and ``--adapter``, in-process on a tiny GGUF model the test writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulref import finetune, models
from simulref.adapters import ADAPTER_PRESETS, check_adapter
from simulref.cli import main
from simulref.trace import read_traces


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> str:
    from tiny_gguf import write_tiny_gguf

    return str(write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", seed=1))


def test_train_then_translate_with_the_adapter(gguf, data, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["train", "--model", gguf, "--data", data, "--iters", "3", "--batch-size", "2",
                 "--lr", "1e-2", "--lora-layers", "1", "-k", "1", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "3 steps" in printed.out and f"--adapter {out}" in printed.out
    assert "step 3/3 loss" in printed.err  # one line per step when not a terminal
    check_adapter(out)
    config = json.loads((out / finetune.CONFIG_FILE).read_text())
    assert config["simulref"]["ks"] == [1, 2] and config["simulref"]["model"] == gguf
    assert config["simulref"]["system"] == "Translate the following English paragraph to French"

    assert main(["translate", "The weather is nice", "--model", gguf, "--adapter", str(out),
                 "--json", "--max-tokens-per-word", "4"]) == 0
    (trace,) = read_traces(capsys.readouterr().out)
    assert dict(trace.settings.extra)["adapter"] == str(out)

    runs = tmp_path / "eval"
    assert main(["eval", data, "--model", gguf, "--adapter", str(out), "-k", "2", "--no-offline",
                 "--limit", "2", "--out", str(runs), "--max-tokens-per-word", "4"]) == 0
    capsys.readouterr()
    traces = read_traces(runs / "traces-group-k2.jsonl")
    assert len(traces) == 2 and all(dict(t.settings.extra)["adapter"] == str(out) for t in traces)
    assert json.loads((runs / "settings.json").read_text())["adapter"] == str(out)

    # Resume to more steps; without --resume the checkpoint is refused (exit 2).
    assert main(["train", "--model", gguf, "--data", data, "--iters", "4", "--batch-size", "2",
                 "--lr", "1e-2", "--lora-layers", "1", "-k", "1", "2", "--out", str(out)]) == 2
    assert "already holds a checkpoint; add --resume" in capsys.readouterr().err
    assert main(["train", "--model", gguf, "--data", data, "--iters", "4", "--batch-size", "2",
                 "--lr", "1e-2", "--lora-layers", "1", "-k", "1", "2", "--out", str(out),
                 "--resume"]) == 0
    assert "4 steps" in capsys.readouterr().out
    # Other settings on resume: a one-line usage error.
    assert main(["train", "--model", gguf, "--data", data, "--iters", "5", "--batch-size", "2",
                 "--lr", "1e-3", "--lora-layers", "1", "--out", str(out), "--resume"]) == 2
    assert "made with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--data", "no-such.tsv"], "--data: expected postgres-en-fr or postgres-en-de or a TSV"),
    (["--batch-size", "5"], "--batch-size: expected at most the 4 training pairs, got 5"),
    (["--valid-data", "missing.tsv"], "--valid-data: missing.tsv: cannot read"),
    (["--lr", "0"], "argument --lr: expected a number > 0"),
    (["-k", "0"], "argument -k/--k: expected an integer >= 1"),
    (["--mode", "offline"], "argument --mode: invalid choice"),
])
def test_bad_options_exit_2_before_a_model_loads(argv, message, data, tmp_path, capsys,
                                                  no_model_load):
    if argv[0] != "--data":
        argv = ["--data", data, *argv]
    if "--batch-size" not in argv:
        argv = [*argv, "--batch-size", "2"]
    assert main(["train", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_missing_adapter_exits_2_before_a_model_loads(tmp_path, capsys, no_model_load):
    assert main(["translate", "a b", "--adapter", str(tmp_path / "none")]) == 2
    assert "--adapter" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    assert main(["eval", "--dataset", "postgres-en-fr", "--adapter", str(tmp_path / "half"),
                 "--out", str(tmp_path / "e")]) == 2
    assert "missing adapters.safetensors" in capsys.readouterr().err


def test_an_adapter_preset_refuses_a_second_adapter(tmp_path):
    with pytest.raises(ValueError, match="is an adapter preset and brings its own adapter"):
        models.load("smollm2-135m-simul-fr", adapter=tmp_path)


@pytest.mark.parametrize("name", sorted(ADAPTER_PRESETS))
def test_shipped_adapter_presets_are_complete(name):
    preset = ADAPTER_PRESETS[name]
    assert preset.base in models.PRESETS
    check_adapter(preset.path)
    config = json.loads((preset.path / finetune.CONFIG_FILE).read_text())
    assert config["fine_tune_type"] == "lora" and config["simulref"]["model"] == preset.base
    size = (preset.path / finetune.ADAPTER_FILE).stat().st_size
    # "A few MB": rank 8 on 16 blocks in float32 is 5.2 MB for SmolLM2, 11.8 MB for Qwen.
    assert size < 12 << 20
    assert not (preset.path / finetune.CHECKPOINT_FILE).exists()  # optimizer state stays out


@pytest.mark.parametrize("option", ["--data", "--valid-data"])
@pytest.mark.parametrize("held", ["test set", "reserved"])
def test_training_data_with_a_held_out_source_is_refused(option, held, data, tmp_path,
                                                         capsys, monkeypatch, no_model_load):
    """A source of a bundled test set, or one whose hash is reserved, never reaches
    training: exit 2 naming the file and line, before the model loads."""
    from simulref import databuild
    from simulref.evaluate import dataset_path, read_pairs

    if held == "test set":
        source = read_pairs(dataset_path("postgres-en-fr"))[7].source
    else:  # the shipped hashes' texts are not known here: reserve one of ours
        source = "this sentence is reserved for the tests only"
        reserved = tmp_path / "reserved.sha256"
        reserved.write_text(databuild.RESERVED.read_text() + databuild.source_hash(source) + "\n")
        monkeypatch.setattr(databuild, "RESERVED", reserved)
    leaky = tmp_path / "leaky.tsv"
    leaky.write_text(Path(data).read_text(encoding="utf-8") + f"  {source} \tune phrase\n",
                     encoding="utf-8")
    argv = ["--data", data, "--valid-data", str(leaky)] if option == "--valid-data" else [
        "--data", str(leaky)]
    assert main(["train", "--out", str(tmp_path / "o"), "--batch-size", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert f"{option}: {leaky}:5: source {source!r} is held out from training" in err
    assert not (tmp_path / "o").exists()
