"""Streaming fine-tuning: LoRA with the decoder's own wait-k masks and group positions.

One training example is one sentence pair. Its source (prefix, every word, suffix) goes
through the model as one *source chunk*, then its target (assistant header, reference
tokens, EOS) as one *target chunk*, both through :func:`simulref.cache.make_stream_cache`,
the cache the decoder uses, so the model files stay mlx-lm's. What a target query may see
of the source is its *budget*, ``StreamState.begin(TARGET, n, visible=...)``:

``mode="streaming"``, wait-k
    The query of a fed token sees as much source as the decoder's forward that sampled the
    *next* token did. The decoder feeds token t and samples the next one from that
    forward, so the query that predicts a token of target word i sees the prefix and the
    first ``min(k + i, N)`` words (plus the suffix once all N are read). That includes
    the last token of word i - 1: the token opening word i was first sampled before the
    read, then dropped, the last token trimmed, word ``k + i`` read and the last token fed
    again (docs/decoder.md, "Drop, trim, re-feed"), so its query (and the key and value
    it leaves in the cache) is the re-fed one. The header is fed with the first budget;
    EOS is predicted with the whole source read (an earlier EOS is dropped and the
    decoder reads on). Target words are cut where the decoder cuts them
    (:func:`word_of_tokens`, the decoder's own token table).
``mode="batch"``
    Every query sees the whole source: plain supervised fine-tuning, the paper's "batch"
    baseline.

Positions are the group layout's: source 0, 1, ...; target from ``target_start``
(``"auto"``: each row's first budget, the decoder's source tokens at the first write; an
int fixes it). Loss: cross-entropy on the reference tokens and EOS only.

LoRA comes from mlx-lm's tuner (``linear_to_lora_layers``), the optimizer from
``mlx.optimizers``, and the output directory is an mlx-lm adapter directory
(``adapters.safetensors`` + ``adapter_config.json``), which ``mlx_lm.load(...,
adapter_path=...)`` and ``simulref.load(..., adapter=...)`` read. Next to them,
``checkpoint.safetensors`` (adapter weights, optimizer state and the step, one file
replaced atomically) makes a run resumable; ``train-log.jsonl`` records losses.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import limits
from .cache import SOURCE, TARGET, StreamState, make_stream_cache
from .prompt import DEFAULT_SYSTEM, template_for

MODES = ("streaming", "batch")
ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
LOG_FILE = "train-log.jsonl"


# ---------------------------------------------------------------- examples (pure)


def word_of_tokens(table, ids: Sequence[int]) -> list[int]:
    """The target word (0-based) each token belongs to, cut as the decoder cuts: a token
    opens a new word when its text starts with whitespace and the current word already
    has non-whitespace text (whitespace-only tokens join the next word)."""
    words, index, content = [], 0, False
    for token in ids:
        if content and table.opens_word(token):
            index, content = index + 1, False
        content = content or table.has_content(token)
        words.append(index)
    return words


def source_budget(prefix: int, word_lengths: Sequence[int], suffix: int, read: int) -> int:
    """Source tokens in the cache once ``read`` words are read: the prefix, those words'
    tokens, and the suffix, which goes with the last word."""
    n = len(word_lengths)
    if not 0 <= read <= n:
        raise ValueError(f"read: expected 0..{n}, got {read!r}")
    return prefix + sum(word_lengths[:read]) + (suffix if read == n else 0)


def query_budgets(prefix: int, word_lengths: Sequence[int], suffix: int, n_header: int,
                  target_words: Sequence[int], k: int | None) -> list[int]:
    """Source budget of every fed target query: header + reference tokens (the query at
    fed index q predicts target token q + 1). ``target_words``: the word of each reference
    token. ``k=None``: the whole source (batch mode)."""
    n = len(word_lengths)
    full = source_budget(prefix, word_lengths, suffix, n)
    if k is None:
        return [full] * (n_header + len(target_words))

    def words_read(word: int) -> int:
        return min(k + word, n)

    # Label of query q: header[q + 1] (q < n_header - 1), reference token q + 1 - n_header,
    # or EOS (the last query), predicted with the whole source read.
    budgets = []
    for q in range(n_header + len(target_words)):
        label = q + 1 - n_header
        if label < 0:
            read = words_read(0)
        elif label < len(target_words):
            read = words_read(target_words[label])
        else:
            read = n
        budgets.append(source_budget(prefix, word_lengths, suffix, read))
    return budgets


@dataclass(frozen=True)
class Example:
    """One sentence pair, tokenized as the decoder feeds it.

    ``source``: prefix + words + suffix; ``inputs``: header + reference tokens (the fed
    target tokens); ``labels``: the token each input predicts (``inputs[1:]`` + EOS);
    ``scored``: how many labels at the end carry loss (reference tokens + EOS);
    ``visible``: each input query's source budget; ``k``: its wait-k (None in batch mode).
    """

    source: tuple[int, ...]
    inputs: tuple[int, ...]
    labels: tuple[int, ...]
    scored: int
    visible: tuple[int, ...]
    k: int | None


def make_example(template, table, eos: int, source: str, target: str, *,
                 mode: str = "streaming", k: int | None = 3) -> Example:
    """Tokenize one pair with ``template`` (see :func:`simulref.prompt.template_for`),
    ``table`` (:func:`simulref.decoder.token_table`) and the EOS id ``eos``."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode == "streaming":
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an int >= 1 in streaming mode, got {k!r}")
    else:
        k = None
    words = source.split()
    if not words:
        raise ValueError("source: expected at least one word")
    word_ids = [tuple(template.word_ids(i, w)) for i, w in enumerate(words)]
    # The reference as the model would write it: no leading space (the header ends the
    # line); tokenized like source text, so a special-token spelling stays plain text.
    reference = tuple(template.encode(target.strip()))
    if not reference:
        raise ValueError(f"target: expected a non-empty reference for {source!r}")
    header = tuple(template.header_ids)
    prefix, suffix = tuple(template.prefix_ids), tuple(template.suffix_ids)
    budgets = query_budgets(len(prefix), [len(w) for w in word_ids], len(suffix), len(header),
                            word_of_tokens(table, reference), k)
    inputs = header + reference
    return Example(
        source=prefix + tuple(t for w in word_ids for t in w) + suffix,
        inputs=inputs, labels=inputs[1:] + (eos,), scored=len(reference) + 1,
        visible=tuple(budgets), k=k)


def make_examples(tokenizer, pairs: Sequence[tuple[str, str]], *, mode: str = "streaming",
                  ks: Sequence[int] = (3,), system: str = DEFAULT_SYSTEM,
                  seed: int = 0, chat_format=None) -> list[Example]:
    """Examples for ``pairs``; in streaming mode each pair's k is drawn from ``ks`` with
    ``seed`` (one k per pair, so a list trains several lags at once)."""
    from .decoder import token_table

    template = template_for(tokenizer, system=system, chat_format=chat_format)
    table = token_table(tokenizer)
    eos = _eos_id(tokenizer)
    rng = random.Random(seed)
    return [make_example(template, table, eos, s, t, mode=mode,
                         k=rng.choice(list(ks)) if mode == "streaming" else None)
            for s, t in pairs]


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        ids = sorted(getattr(tokenizer, "eos_token_ids", ()) or ())
        if not ids:
            raise ValueError("tokenizer: it has no EOS token to end the target with")
        eos = ids[0]
    return int(eos)


# ---------------------------------------------------------------- forward and loss


def pad_batch(examples: Sequence[Example], pad: int = 0) -> dict:
    """NumPy arrays, rows right-padded. Padding sits after each row's source (so no budget
    reaches it) and after each row's target (causal: no real query sees it); ``weights``
    is 1 on scored labels."""
    import numpy as np

    rows = len(examples)
    s = max(len(e.source) for e in examples)
    t = max(len(e.inputs) for e in examples)
    source = np.full((rows, s), pad, dtype=np.int32)
    inputs = np.full((rows, t), pad, dtype=np.int32)
    labels = np.zeros((rows, t), dtype=np.int32)
    weights = np.zeros((rows, t), dtype=np.float32)
    visible = np.zeros((rows, t), dtype=np.int64)
    for r, e in enumerate(examples):
        n = len(e.inputs)
        source[r, : len(e.source)] = e.source
        inputs[r, :n] = e.inputs
        labels[r, :n] = e.labels
        weights[r, n - e.scored : n] = 1.0
        visible[r, :n] = e.visible
        visible[r, n:] = e.visible[-1]  # pad queries: any budget this row allows
    return {"source": source, "inputs": inputs, "labels": labels, "weights": weights,
            "visible": visible,
            "tokens": sum(len(e.source) + len(e.inputs) for e in examples)}  # unpadded


def target_logits(model, batch: dict, target_start: int | str = "auto"):
    """Logits of every fed target token, shape (rows, T, vocab): the source chunk, then the
    target chunk with its budgets, through the decoder's cache."""
    import mlx.core as mx

    caches = make_stream_cache(model, "group", target_start)
    state = caches[0].shared
    source = mx.array(batch["source"])
    state.begin(SOURCE, source.shape[1])
    model(source, cache=caches)  # only the cache is used: lazy, its logits never computed
    inputs = mx.array(batch["inputs"])
    state.begin(TARGET, inputs.shape[1], visible=batch["visible"])
    return model(inputs, cache=caches)


def loss(model, batch: dict, target_start: int | str = "auto"):
    """(mean cross-entropy over scored labels, number of scored labels)."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = target_logits(model, batch, target_start).astype(mx.float32)
    weights = mx.array(batch["weights"])
    ce = nn.losses.cross_entropy(logits, mx.array(batch["labels"])) * weights
    count = weights.sum()
    return ce.sum() / count, count


# ---------------------------------------------------------------- LoRA and files


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    scale: float = 10.0
    dropout: float = 0.0
    num_layers: int = 16  # the last N transformer blocks, mlx-lm's convention

    def mlx_config(self) -> dict:
        return {"rank": self.rank, "scale": self.scale, "dropout": self.dropout}


def add_lora(model, lora: LoraConfig):
    """Freeze ``model`` and give its last ``lora.num_layers`` blocks LoRA layers (every
    linear layer, mlx-lm's default keys)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(model, min(lora.num_layers, len(model.layers)), lora.mlx_config())
    return model


def adapter_config(lora: LoraConfig, settings: dict) -> dict:
    """mlx-lm's adapter_config.json fields (what ``load_adapters`` reads), plus simulref's
    training settings under ``"simulref"``."""
    return {"fine_tune_type": "lora", "num_layers": lora.num_layers,
            "lora_parameters": lora.mlx_config(), "simulref": settings}


def _replace_atomically(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then fsync and rename over ``path``: readers see the old file or
    the new one, and a full disk is a :class:`simulref.atomic.WriteError` (MLX's
    save_safetensors wants a path, not a file object: :func:`simulref.atomic.replace_with`)."""
    from .atomic import replace_with

    replace_with(path, write)


def save_adapter(model, out: Path, config: dict) -> None:
    """The mlx-lm adapter directory: weights first, then the config (each atomic)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .atomic import atomic_write

    weights = dict(tree_flatten(model.trainable_parameters()))
    _replace_atomically(out / ADAPTER_FILE, lambda p: mx.save_safetensors(p, weights))
    with atomic_write(out / CONFIG_FILE, text=True) as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")


def save_checkpoint(model, optimizer, out: Path, step: int, config: dict) -> None:
    """Adapter weights + optimizer state + step in one file, replaced atomically; then
    the adapter directory files, so they always match a finished step."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    arrays = {f"model.{k}": v for k, v in tree_flatten(model.trainable_parameters())}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    metadata = {"step": str(step), "config": json.dumps(config, sort_keys=True)}
    _replace_atomically(out / CHECKPOINT_FILE,
                        lambda p: mx.save_safetensors(p, arrays, metadata=metadata))
    save_adapter(model, out, config)


def checkpoint_info(out: Path) -> tuple[int, dict]:
    """``(step, config)`` of the checkpoint in ``out``, read from its metadata alone (no
    model needed: a resume can be checked before anything is loaded or written)."""
    import mlx.core as mx

    _, metadata = mx.load(str(Path(out) / CHECKPOINT_FILE), return_metadata=True)
    return int(metadata["step"]), json.loads(metadata["config"])


# Training settings not compared on a resume: the data's name (its content's hash is:
# ``./ok1.tsv`` and ``ok1.tsv`` are the same data), and the copy of the LoRA settings
# (compared as the adapter config's lora_parameters and num_layers).
RESUMABLE_SETTINGS = frozenset({"data", "lora"})


def resume_differences(saved: dict, config: dict) -> list[str]:
    """One phrase per setting in which the checkpoint's adapter config ``saved`` and this
    run's ``config`` differ (the training settings, the LoRA parameters, the blocks)."""
    def flat(c: dict) -> dict:
        out = {k: v for k, v in (c.get("simulref") or {}).items()
               if k not in RESUMABLE_SETTINGS}
        out.update({f"lora_parameters.{k}": v for k, v in
                    (c.get("lora_parameters") or {}).items()})
        out["num_layers"] = c.get("num_layers")
        return out

    a, b = flat(saved), flat(config)
    return [f"{key}: the checkpoint has {a.get(key)!r}, now {b.get(key)!r}"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def check_resume(out: Path, config: dict, iters: int) -> int:
    """The step of the checkpoint in ``out`` once checked against this run: the same
    settings (ValueError naming each key that differs) and a step below ``iters``
    (ValueError: a resume would train nothing and report the checkpoint's steps)."""
    step, saved = checkpoint_info(out)
    differences = resume_differences(saved, config)
    if differences:
        raise ValueError(f"resume: the checkpoint in {out} was made with other settings "
                         f"({'; '.join(differences)}); use another --out or the same options")
    if step >= iters:
        raise ValueError(f"iters: the checkpoint in {out} is at step {step}, and --iters is "
                         f"{iters}: nothing to train; give --iters above {step} to train on")
    return step


def has_lora(model) -> bool:
    """Whether ``model`` already has LoRA (or DoRA) layers: an adapter applied."""
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    kinds = (LoRALinear, LoRASwitchLinear, LoRAEmbedding, DoRALinear, DoRAEmbedding)
    return any(isinstance(m, kinds) for _, m in model.named_modules())


def load_checkpoint(model, optimizer, out: Path) -> tuple[int, dict]:
    """Restore what :func:`save_checkpoint` wrote; returns ``(step, config)``."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    arrays, metadata = mx.load(str(out / CHECKPOINT_FILE), return_metadata=True)
    weights = [(k[len("model."):], v) for k, v in arrays.items() if k.startswith("model.")]
    model.load_weights(weights, strict=False)
    state = [(k[len("optimizer."):], v) for k, v in arrays.items()
             if k.startswith("optimizer.")]
    optimizer.state = tree_unflatten(state)
    return int(metadata["step"]), json.loads(metadata["config"])


# ---------------------------------------------------------------- the loop


@dataclass
class TrainSettings:
    """What a run depends on; a resumed run must have the same (``iters`` and
    ``max_minutes`` may change)."""

    mode: str = "streaming"
    ks: tuple[int, ...] = (3,)
    target_start: int | str = "auto"
    system: str = DEFAULT_SYSTEM
    batch_size: int = 8
    lr: float = 1e-4
    seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)
    model: str = ""
    data: str = ""
    data_sha256: str = ""

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ks"] = list(self.ks) if self.mode == "streaming" else None
        return d


def pairs_sha256(pairs: Sequence[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for s, t in pairs:
        digest.update(f"{s}\t{t}\n".encode())
    return digest.hexdigest()


def batch_order(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of training step ``step`` (0-based): epochs of a seeded shuffle,
    cut into batches; a pure function of the step, so a resumed run sees the same data."""
    if n < batch_size:
        raise ValueError(f"batch_size: expected at most the {n} training pairs, "
                         f"got {batch_size}")
    per_epoch = n // batch_size  # the remainder of an epoch is skipped
    epoch, index = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[index * batch_size: (index + 1) * batch_size]


def evaluate_loss(model, examples: Sequence[Example], batch_size: int,
                  target_start: int | str = "auto") -> float:
    """Mean cross-entropy per scored token over ``examples`` (no gradient)."""
    import mlx.core as mx

    total, count = 0.0, 0.0
    for i in range(0, len(examples), batch_size):
        value, n = loss(model, pad_batch(examples[i: i + batch_size]), target_start)
        mx.eval(value, n)
        total += value.item() * n.item()
        count += n.item()
    return total / count if count else math.nan


@dataclass(frozen=True)
class Progress:
    """One report for the ``on_step`` callback."""

    step: int
    iters: int
    loss: float
    tokens_per_s: float
    elapsed_s: float


def train(model, tokenizer, pairs: Sequence[tuple[str, str]], out: str | os.PathLike, *,
          mode: str = "streaming", k: int | Sequence[int] = 3,
          target_start: int | str = "auto", iters: int = 100, batch_size: int = 8,
          lr: float = 1e-4, lora: LoraConfig | None = None, system: str = DEFAULT_SYSTEM,
          valid_pairs: Sequence[tuple[str, str]] = (), seed: int = 0,
          steps_per_save: int = 50, max_minutes: float | None = None,
          resume: bool = False, model_name: str = "", data_name: str = "",
          steps_per_eval: int | None = None,
          on_step: Callable[[Progress], None] | None = None) -> dict:
    """LoRA-train ``model`` on ``pairs`` (``(source, reference)`` strings) and write an
    mlx-lm adapter directory to ``out``; see the module docstring for the modes.

    ``k``: the wait-k lag, or several (each pair draws one, seeded). ``max_minutes``
    stops early (after a whole step) and saves. ``resume=True`` continues the checkpoint
    in ``out`` (same settings required; without a checkpoint it starts afresh); without
    it an existing checkpoint is refused. ``steps_per_eval``: also log the validation
    loss every N steps (a loss curve; it draws nothing, so it changes no weight).
    Everything that draws is seeded by ``seed``: the LoRA initialisation, the data order
    and the k of each pair, so the same call gives bit-identical adapters. Returns a
    summary dict (steps, losses, time).
    """
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    ks = (k,) if isinstance(k, int) else tuple(k)
    lora = lora or LoraConfig()
    # What is actually adapted (mlx-lm takes the last N blocks, at most all of them).
    lora = replace(lora, num_layers=min(lora.num_layers, len(model.layers)))
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    for name, value in (("iters", iters), ("batch_size", batch_size),
                        ("steps_per_save", steps_per_save),
                        ("steps_per_eval", 1 if steps_per_eval is None else steps_per_eval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if not ks or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ks):
        raise ValueError(f"k: expected ints >= 1, got {k!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"lr: expected a number > 0, got {lr!r}")
    StreamState("group", target_start)  # checks target_start before any work is done
    if has_lora(model):
        raise ValueError("model: it already has LoRA layers (an adapter preset, or a model "
                         "loaded with an adapter); train on its base model instead")
    if len(pairs) < batch_size:
        raise ValueError(f"batch_size: expected at most the {len(pairs)} training pairs, "
                         f"got {batch_size}")
    out = Path(out)
    settings = TrainSettings(mode=mode, ks=ks, target_start=target_start, system=system,
                             batch_size=batch_size, lr=lr, seed=seed, lora=lora,
                             model=model_name, data=data_name, data_sha256=pairs_sha256(pairs))
    config = adapter_config(lora, settings.as_dict())

    examples = make_examples(tokenizer, pairs, mode=mode, ks=ks, system=system, seed=seed)
    valid = make_examples(tokenizer, valid_pairs, mode=mode, ks=ks, system=system,
                          seed=seed + 1)
    # What translate refuses, training refuses too (simulref.limits), before any file.
    context = limits.context_length(model)
    assumed = limits.declared_context_length(model) is None
    for name, group in (("pairs", examples), ("valid_pairs", valid)):
        limits.check_examples_fit(group, context, target_start=target_start,
                                  assumed=assumed, argument=name)
    # An existing checkpoint is checked (refused, or its settings and step against this
    # run's) before anything is loaded, made or written.
    resuming = (out / CHECKPOINT_FILE).is_file()
    if resuming and not resume:
        raise ValueError(f"out: {out} already holds a checkpoint; pass resume=True "
                         f"(--resume) to continue it or choose another directory")
    if resuming:
        check_resume(out, config, iters)
    out.mkdir(parents=True, exist_ok=True)
    # LoRA's A matrices are drawn from MLX's global generator: seed it, so that the
    # same seed gives the same adapter (a resumed run loads them from the checkpoint).
    mx.random.seed(seed)
    add_lora(model, lora)
    optimizer = optim.Adam(learning_rate=lr)
    step = 0
    if resuming:
        # Build the optimizer state's tree first, so the saved one maps onto it.
        optimizer.init(model.trainable_parameters())
        step, _ = load_checkpoint(model, optimizer, out)

    value_and_grad = nn.value_and_grad(model, lambda m, b: loss(m, b, target_start))
    started = time.monotonic()
    log = out / LOG_FILE
    summary = {"start_step": step, "valid_before": None, "valid_after": None}
    if valid:
        summary["valid_before"] = evaluate_loss(model, valid, batch_size, target_start)
        _log(log, {"step": step, "valid_loss": summary["valid_before"]})
    tokens, window_start, losses = 0, time.monotonic(), []
    while step < iters:
        batch = pad_batch([examples[i] for i in batch_order(len(examples), batch_size,
                                                             step, seed)])
        (value, count), grads = value_and_grad(model, batch)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, value, count)
        step += 1
        tokens += batch["tokens"]
        losses.append(value.item())
        now = time.monotonic()
        report = Progress(step, iters, losses[-1], tokens / max(now - window_start, 1e-9),
                          now - started)
        if on_step is not None:
            on_step(report)
        _log(log, asdict(report))
        out_of_time = max_minutes is not None and now - started >= max_minutes * 60
        if step % steps_per_save == 0 or step == iters or out_of_time:
            save_checkpoint(model, optimizer, out, step, config)
        if valid and steps_per_eval and step % steps_per_eval == 0 and step < iters \
                and not out_of_time:
            _log(log, {"step": step, "valid_loss": evaluate_loss(model, valid, batch_size,
                                                                 target_start)})
        if out_of_time:
            break
    if valid:
        summary["valid_after"] = evaluate_loss(model, valid, batch_size, target_start)
        _log(log, {"step": step, "valid_loss": summary["valid_after"]})
    summary.update(steps=step, train_losses=losses, seconds=time.monotonic() - started,
                   out=str(out))
    return summary


def _log(path: Path, record: dict) -> None:
    """One line of the training log; a full disk leaves no half line (WriteError)."""
    from .atomic import append_line

    append_line(path, json.dumps(record, sort_keys=True) + "\n", fsync=False)
