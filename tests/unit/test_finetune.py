"""Streaming fine-tuning: training and decoding agree, the loss goes down, adapters load.

The central check is the streaming-batch mismatch made a test: the teacher-forced
training logits of every target token equal the logits the decoder samples from when it
is forced to write the reference (same k, layout and target start), on tiny random
models. The decoder is forced with a sampler that ignores its logits and returns the
reference token the forward it follows stands for; ``on_forward`` records the logits.
"""

from __future__ import annotations

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulref import finetune, limits
from simulref.decoder import token_table, translate
from simulref.policy import WaitK, schedule
from simulref.prompt import DEFAULT_SYSTEM, template_for
from simulref.testing import tiny_model, tiny_tokenizer

ATOL = 5e-4
EN = ("the", "weather", "is", "nice", "today", "so", "we", "walk", "in", "park", "server",
      "closed", "connection", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "42")
FR = ("il", "fait", "beau", "aujourd'hui", "alors", "nous", "allons", "dans", "le", "parc",
      "serveur", "a", "fermé", "la", "connexion", "renard", "brun", "saute", "chien", "3.14",
      "à", "l'utilisateur,", "requête.")
PAIRS = [
    ("The weather is nice today, so we walk", "Il fait beau aujourd'hui, alors nous marchons"),
    ("I want to buy a new car because", "Je veux acheter une nouvelle voiture"),
    ("The quick brown fox jumps over the lazy dog.",
     "Le renard brun rapide saute par-dessus le chien."),
    ("canceling statement due to user request",
     "annulation de la requête à la demande de l'utilisateur"),
]


def example(tokenizer, source, target, mode="streaming", k=3):
    template = template_for(tokenizer, system=DEFAULT_SYSTEM)
    return finetune.make_example(template, token_table(tokenizer), tokenizer.eos_token_id,
                                 source, target, mode=mode, k=k)


def forced_decoder_logits(model, tokenizer, ex, source, k, target_start):
    """{label index: logits the decoder sampled it from} with the decoder forced to write
    the example's reference; the last forward per label wins (earlier ones were dropped:
    an opening token predicted before a read, an EOS before the source ended)."""
    header = len(ex.inputs) - ex.scored + 1
    full = list(ex.inputs) + [ex.labels[-1]]
    records = []

    def label_of(forward) -> int:
        first = next(r for r in records if r.kind == "target").positions[0]
        return forward.positions[-1] - first + 1

    def force(logprobs):
        return mx.array([full[min(label_of(records[-1]), len(full) - 1)]])

    # The incremental engine: the decoder's reference twin, one row per forward (the other
    # engines are held equal to it by the engine tests).
    trace = translate(model, tokenizer, source, k=k, target_start=target_start,
                      engine="incremental", sampler=force, on_forward=records.append)
    written = [t for w in trace.writes for t in w.token_ids]
    assert written == full[header:-1], "the decoder did not write the reference"
    got = {}
    for forward in records:
        if forward.kind == "target" and label_of(forward) < len(full):
            got[label_of(forward)] = forward.logits
    return {i: got[i] for i in range(header, len(full))}


def assert_agree(model, tokenizer, pairs, ks, target_start):
    examples = [example(tokenizer, s, t, k=k) for (s, t), k in zip(pairs, ks, strict=True)]
    logits = finetune.target_logits(model, finetune.pad_batch(examples), target_start)
    for row, ((source, _), k, ex) in enumerate(zip(pairs, ks, examples, strict=True)):
        decoded = forced_decoder_logits(model, tokenizer, ex, source, k, target_start)
        assert len(decoded) == ex.scored
        for label, expected in decoded.items():
            diff = float(mx.abs(logits[row, label - 1] - expected).max())
            assert diff < ATOL, (row, label, diff)


words = st.lists(st.sampled_from(EN), min_size=1, max_size=8)
targets = st.lists(st.sampled_from(FR), min_size=1, max_size=10)


@settings(max_examples=25)
@given(arch=st.sampled_from(["llama", "qwen2"]), source=words, target=targets,
       k=st.integers(1, 5), target_start=st.one_of(st.just("auto"), st.integers(0, 60)))
def test_training_logits_equal_forced_decoder_logits(arch, source, target, k, target_start):
    assert_agree(tiny_model(arch, seed=3), tiny_tokenizer(), [(" ".join(source), " ".join(target))],
                 [k], target_start)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("target_start", ["auto", 7])
def test_padded_rows_with_their_own_k_and_start_each_equal_the_decoder(arch, target_start):
    # Rows of different lengths, lags and (with "auto") target starts in one forward.
    assert_agree(tiny_model(arch, seed=1), tiny_tokenizer(), PAIRS, [1, 3, 2, 9], target_start)


def test_batch_mode_is_plain_causal_training_on_the_whole_prompt():
    model, tokenizer = tiny_model("llama", seed=2), tiny_tokenizer()
    examples = [example(tokenizer, s, t, mode="batch") for s, t in PAIRS]
    logits = finetune.target_logits(model, finetune.pad_batch(examples))
    for row, ex in enumerate(examples):
        plain = model(mx.array([list(ex.source) + list(ex.inputs)]))  # no cache: causal
        got = logits[row, : len(ex.inputs)]
        assert float(mx.abs(got - plain[0, len(ex.source):]).max()) < ATOL


def test_streaming_with_k_past_the_source_is_batch_mode():
    tokenizer = tiny_tokenizer()
    for source, target in PAIRS:
        n = len(source.split())
        streaming = example(tokenizer, source, target, k=n)
        batch = example(tokenizer, source, target, mode="batch")
        assert streaming.k == n and batch.k is None
        assert streaming == dataclasses.replace(batch, k=n)
        assert example(tokenizer, source, target, k=n - 1).visible != batch.visible


@given(prefix=st.integers(0, 5), lengths=st.lists(st.integers(1, 4), min_size=1, max_size=8),
       suffix=st.integers(0, 3), header=st.integers(1, 4),
       target_words=st.lists(st.integers(0, 3), max_size=12).map(sorted),
       k=st.integers(1, 10))
def test_query_budgets_follow_the_wait_k_schedule(prefix, lengths, suffix, header,
                                                   target_words, k):
    n = len(lengths)
    budgets = finetune.query_budgets(prefix, lengths, suffix, header, target_words, k)
    assert len(budgets) == header + len(target_words)
    full = prefix + sum(lengths) + suffix
    assert budgets[-1] == full  # EOS: the whole source
    assert budgets == sorted(budgets)  # reads only add source
    delays = schedule(WaitK(k), n, max(target_words, default=-1) + 1)

    def tokens(read):
        return prefix + sum(lengths[:read]) + (suffix if read == n else 0)

    assert budgets[:header - 1] == [tokens(delays[0] if delays else min(k, n))] * (header - 1)
    for label, word in enumerate(target_words):
        # The query predicting a token of word i sees the words read before word i.
        assert budgets[header - 1 + label] == tokens(delays[word])
    assert finetune.query_budgets(prefix, lengths, suffix, header, target_words, None) == \
        [full] * len(budgets)


def test_word_of_tokens_cuts_where_the_decoder_does():
    tokenizer = tiny_tokenizer()
    table = token_table(tokenizer)
    text = "Il fait  beau\naujourd'hui, alors"
    ids = tokenizer.encode(text, add_special_tokens=False)
    words = finetune.word_of_tokens(table, ids)
    pieces = {}
    for token, word in zip(ids, words, strict=True):
        pieces[word] = pieces.get(word, "") + table.text([token])
    assert [pieces[w] for w in sorted(pieces)] == ["Il", " fait", "  beau", "\naujourd'hui,",
                                                   " alors"]


def test_make_example_rejects_bad_arguments():
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="mode: expected one of"):
        example(tokenizer, "a b", "c", mode="offline")
    with pytest.raises(ValueError, match="k: expected an int >= 1"):
        example(tokenizer, "a b", "c", k=0)
    with pytest.raises(ValueError, match="target: expected a non-empty reference"):
        example(tokenizer, "a b", "  ")


@given(st.integers(1, 30), st.integers(1, 8), st.integers(0, 40), st.integers(0, 5))
def test_batch_order_is_a_pure_function_of_the_step(n, batch_size, step, seed):
    if n < batch_size:
        with pytest.raises(ValueError, match="batch_size: expected at most the"):
            finetune.batch_order(n, batch_size, step, seed)
        return
    picked = finetune.batch_order(n, batch_size, step, seed)
    assert len(picked) == batch_size and all(0 <= i < n for i in picked)
    assert picked == finetune.batch_order(n, batch_size, step, seed)
    per_epoch = n // batch_size
    first = step - step % per_epoch
    epoch = [i for s in range(first, first + per_epoch)
             for i in finetune.batch_order(n, batch_size, s, seed)]
    assert len(set(epoch)) == len(epoch)  # no pair twice within an epoch


# --- training ------------------------------------------------------------------------


def tiny_train(out, mode="streaming", iters=12, draw_before=0, **kwargs):
    model, tokenizer = tiny_model("llama", seed=0), tiny_tokenizer()
    for _ in range(draw_before):  # a model loaded from a file leaves the generator anywhere
        mx.eval(mx.random.uniform(shape=(1,)))
    options = dict(mode=mode, k=[1, 2, 3], iters=iters, batch_size=4, lr=1e-2,
                   valid_pairs=PAIRS, steps_per_save=4,
                   lora=finetune.LoraConfig(rank=4, num_layers=2)) | kwargs
    return model, finetune.train(model, tokenizer, PAIRS * 2, out, **options)


@pytest.mark.parametrize("mode", finetune.MODES)
def test_a_few_steps_lower_the_loss(tmp_path, mode):
    _, summary = tiny_train(tmp_path, mode)
    assert summary["steps"] == 12
    assert summary["valid_after"] < summary["valid_before"] - 1.0
    losses = summary["train_losses"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    log = [json.loads(line) for line in (tmp_path / finetune.LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 13))


def test_adapter_directory_loads_with_mlx_lm_and_simulref(tmp_path):
    from mlx_lm.tuner.utils import load_adapters

    from simulref.adapters import apply_adapter

    trained, _ = tiny_train(tmp_path / "a", iters=4)
    config = json.loads((tmp_path / "a" / finetune.CONFIG_FILE).read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"] == {"rank": 4, "scale": 10.0, "dropout": 0.0}
    assert config["simulref"]["mode"] == "streaming" and config["simulref"]["ks"] == [1, 2, 3]
    tokens = mx.array([[5, 17, 42, 99, 7]])
    expected = trained(tokens)
    base = tiny_model("llama", seed=0)
    assert float(mx.abs(base(tokens) - expected).max()) > 1e-3  # the adapter does something
    for load in (load_adapters, apply_adapter):
        model = load(tiny_model("llama", seed=0), str(tmp_path / "a"))
        assert float(mx.abs(model(tokens) - expected).max()) < 1e-5


def test_adapter_loads_with_mlx_lm_load(tmp_path):
    import mlx_lm
    from mlx_lm.utils import save_config, save_model

    model_dir = tmp_path / "model"
    model = tiny_model("qwen2", seed=0)
    save_model(model_dir, model)
    save_config({**vars(model.args), "model_type": "qwen2"}, model_dir / "config.json")
    tiny_tokenizer()._tokenizer.save_pretrained(model_dir)
    trained = finetune.train(model, tiny_tokenizer(), PAIRS, tmp_path / "a", iters=2,
                             batch_size=2, lr=1e-2, lora=finetune.LoraConfig(num_layers=1))
    assert trained["steps"] == 2
    loaded, _ = mlx_lm.load(str(model_dir), adapter_path=str(tmp_path / "a"))
    tokens = mx.array([[5, 17, 42]])
    assert float(mx.abs(loaded(tokens) - model(tokens)).max()) < 1e-5


def test_resume_continues_exactly(tmp_path):
    straight, _ = tiny_train(tmp_path / "straight", iters=8)
    tiny_train(tmp_path / "split", iters=4, draw_before=3)
    resumed, summary = tiny_train(tmp_path / "split", iters=8, resume=True, draw_before=5)
    assert summary["start_step"] == 4 and summary["steps"] == 8
    assert_same_adapter(tmp_path / "straight", tmp_path / "split")


def assert_same_adapter(a_dir, b_dir):
    """Bit-identical adapter weights."""
    a = mx.load(str(a_dir / finetune.ADAPTER_FILE))
    b = mx.load(str(b_dir / finetune.ADAPTER_FILE))
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(np.array(a[name]), np.array(b[name])), name


def test_the_same_seed_gives_a_bit_identical_adapter(tmp_path):
    tiny_train(tmp_path / "a", iters=4, seed=3, draw_before=1)
    tiny_train(tmp_path / "b", iters=4, seed=3, draw_before=7)  # another generator state
    assert_same_adapter(tmp_path / "a", tmp_path / "b")
    tiny_train(tmp_path / "c", iters=4, seed=4)
    a = mx.load(str(tmp_path / "a" / finetune.ADAPTER_FILE))
    c = mx.load(str(tmp_path / "c" / finetune.ADAPTER_FILE))
    assert any(not np.array_equal(np.array(a[n]), np.array(c[n])) for n in a)


def test_validation_every_n_steps_is_logged_and_changes_no_weight(tmp_path):
    tiny_train(tmp_path / "plain", iters=8)
    tiny_train(tmp_path / "curve", iters=8, steps_per_eval=3)
    log = [json.loads(line) for line in
           (tmp_path / "curve" / finetune.LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log if "valid_loss" in r] == [0, 3, 6, 8]
    assert_same_adapter(tmp_path / "plain", tmp_path / "curve")


def test_checkpoint_refuses_other_settings_and_overwrites(tmp_path):
    tiny_train(tmp_path, iters=4)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        tiny_train(tmp_path, iters=8)
    with pytest.raises(ValueError, match="made with other settings"):
        tiny_train(tmp_path, iters=8, resume=True, lr=5e-3)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_max_minutes_stops_and_saves(tmp_path):
    _, summary = tiny_train(tmp_path, iters=50, max_minutes=1e-9)
    assert summary["steps"] == 1
    assert (tmp_path / finetune.CHECKPOINT_FILE).is_file()


@settings(max_examples=15)
@given(arch=st.sampled_from(["llama", "qwen2"]), source=words, target=targets,
       k=st.integers(1, 5), target_start=st.one_of(st.just("auto"), st.integers(0, 60)))
def test_training_logits_equal_the_prefilled_engines_rows(arch, source, target, k,
                                                          target_start):
    """The prefilled engine feeds each target token in rows of different source budgets
    (``Forward.visible``); the row with the training budget of each label has its logits."""
    model, tokenizer = tiny_model(arch, seed=3), tiny_tokenizer()
    source, target = " ".join(source), " ".join(target)
    ex = example(tokenizer, source, target, k=k)
    logits = finetune.target_logits(model, finetune.pad_batch([ex]), target_start)
    full = list(ex.inputs) + [ex.labels[-1]]
    header = len(ex.inputs) - ex.scored + 1
    records = []

    def label_of(forward) -> int:
        first = next(r for r in records if r.kind == "target").positions[0]
        return forward.positions[-1] - first + 1

    def force(logprobs):
        token = full[min(label_of(records[-1]), len(full) - 1)]
        return mx.array([token] * logprobs.shape[0])

    trace = translate(model, tokenizer, source, k=k, target_start=target_start,
                      engine="prefilled", sampler=force, on_forward=records.append)
    assert [t for w in trace.writes for t in w.token_ids] == full[header:-1]
    rows = {}  # (label, budget) -> logits of the last forward that had that row
    for forward in records:
        if forward.kind != "target" or label_of(forward) >= len(full):
            continue
        stacked = forward.logits if forward.logits.ndim == 2 else forward.logits[None]
        for row, budget in enumerate(forward.visible):
            rows[label_of(forward), budget] = stacked[row]
    for label in range(header, len(full)):
        expected = rows[label, ex.visible[label - 1]]
        assert float(mx.abs(logits[0, label - 1] - expected).max()) < ATOL, label


@pytest.mark.parametrize("option, value, message", [
    ("iters", 0, "iters: expected an int >= 1"),
    ("batch_size", 9, "batch_size: expected at most the 8 training pairs"),
    ("k", [2, 0], "k: expected ints >= 1"),
    ("lr", 0.0, "lr: expected a number > 0"),
    ("mode", "offline", "mode: expected one of"),
    ("target_start", -1, "target_start: expected 'auto' or an int >= 0"),
])
def test_train_rejects_bad_arguments(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_train(tmp_path, **{option: value})



@pytest.mark.parametrize("option, value, message", [
    ("pairs", [("word " * 40, "mot " * 40)] * 4, r"pairs\[0\]: the pair needs \d+ tokens"),
    ("target_start", 100000, r"target_start: 100000 puts the target group"),
])
def test_train_refuses_what_cannot_fit_in_the_context(tmp_path, option, value, message):
    """Issue 21, item 8: the check translate makes (simulref.limits), before training
    starts and before --out is made."""
    model, tokenizer = tiny_model("llama", seed=0), tiny_tokenizer()
    model.args.max_position_embeddings = 128
    options = dict(iters=1, batch_size=2, lora=finetune.LoraConfig(rank=4, num_layers=1))
    pairs = value if option == "pairs" else PAIRS
    if option == "target_start":
        options["target_start"] = value
    with pytest.raises(limits.ContextError, match=message):
        finetune.train(model, tokenizer, pairs, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


# --- resuming: what it refuses, and how it says so (issue 21, item 9) ---------------------


def test_a_resume_with_the_same_data_under_another_path_is_the_same_run(tmp_path):
    tiny_train(tmp_path, iters=4, data_name="ok1.tsv")
    _, summary = tiny_train(tmp_path, iters=6, resume=True, data_name="./ok1.tsv")
    assert summary["start_step"] == 4 and summary["steps"] == 6


def test_a_resume_with_other_settings_names_the_key_that_differs(tmp_path):
    tiny_train(tmp_path, iters=4)
    with pytest.raises(ValueError) as caught:
        tiny_train(tmp_path, iters=8, resume=True, lr=5e-3)
    message = str(caught.value)
    assert "lr: the checkpoint has 0.01, now 0.005" in message, message
    assert "'mode'" not in message and "data_sha256" not in message  # not the whole dict
    with pytest.raises(ValueError, match=r"lora_parameters.rank: the checkpoint has 4, now 2"):
        tiny_train(tmp_path, iters=8, resume=True, lora=finetune.LoraConfig(rank=2,
                                                                            num_layers=2))


def test_a_resume_past_iters_is_refused_and_changes_nothing(tmp_path):
    tiny_train(tmp_path, iters=4)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for iters in (3, 4):
        with pytest.raises(ValueError, match=rf"iters: the checkpoint in .* is at step 4, "
                                             rf"and --iters is {iters}: nothing to train"):
            tiny_train(tmp_path, iters=iters, resume=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_model_that_already_has_lora_layers_is_refused_before_out_is_made(tmp_path):
    model, tokenizer = tiny_model("llama", seed=0), tiny_tokenizer()
    finetune.add_lora(model, finetune.LoraConfig(rank=4, num_layers=1))
    with pytest.raises(ValueError, match="model: it already has LoRA layers"):
        finetune.train(model, tokenizer, PAIRS, tmp_path / "out", iters=1, batch_size=2)
    assert not (tmp_path / "out").exists()


def test_a_full_disk_while_saving_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    """Issue 21, item 4: MLX reports a full disk as a RuntimeError from
    save_safetensors; train raises a WriteError naming the file and leaves the previous
    checkpoint and adapter whole, with no temp file: a resume continues from there."""
    from simulref import atomic

    real_save, saves = mx.save_safetensors, []

    def full_at_the_third_save(path, arrays, **kwargs):
        saves.append(path)
        if len(saves) == 3:  # the checkpoint of step 8 (each save: checkpoint, adapter)
            with open(path, "wb") as handle:
                handle.write(b"partial")
            raise RuntimeError("[write] Unable to write 94557 bytes to file.")
        return real_save(path, arrays, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", full_at_the_third_save)
    with pytest.raises(atomic.WriteError, match=r"checkpoint.safetensors: cannot write"):
        tiny_train(tmp_path, iters=8)
    assert finetune.checkpoint_info(tmp_path)[0] == 4
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(mx, "save_safetensors", real_save)
    _, summary = tiny_train(tmp_path, iters=8, resume=True)
    assert summary["start_step"] == 4 and summary["steps"] == 8
    log = (tmp_path / finetune.LOG_FILE).read_text()
    assert log.endswith("\n") and all(json.loads(line) for line in log.splitlines())
