"""Tiny, seeded models and a tiny tokenizer for tests and examples.

They load in milliseconds and need no download, so the unit tests can exercise the
real code paths (a real byte-level BPE tokenizer with a ChatML chat template, real
``mlx_lm`` model classes) without a model preset. Their outputs are meaningless
text; what matters is that they are deterministic for a given seed.
"""

from __future__ import annotations

from functools import cache

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Enough text for a BPE with a few hundred merges in both languages the tests use.
_TRAINING_TEXT = """
Translate the following English paragraph to French. Translate the following sentence.
The weather is nice today, so we are going to walk in the park.
Il fait beau aujourd'hui, alors nous allons nous promener dans le parc.
The quick brown fox jumps over the lazy dog. Le renard brun rapide saute par-dessus le chien.
Sets the message levels that are sent to the client. Initialise les niveaux de message.
canceling statement due to user request. annulation de la requête à la demande de l'utilisateur.
I want to buy a new car because my old one is broken. Je veux acheter une nouvelle voiture.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2025 3.14 — punctuation: , . ; : ! ? ( ) " ' -
You are a helpful assistant. Vous êtes un assistant utile. Übersetze den folgenden Satz.
"""


@cache
def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with ChatML special tokens and a chat template.

    Returned as an ``mlx_lm`` ``TokenizerWrapper`` around a ``PreTrainedTokenizerFast``,
    the same kind of object ``mlx_lm.load`` returns. ``<|im_end|>`` is its EOS token.
    """
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHATML_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TRAINING_TEXT.strip().splitlines(), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    hf.chat_template = CHATML_TEMPLATE
    return TokenizerWrapper(hf)


def tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int | None = None):
    """A 2-layer ``mlx_lm`` model of architecture ``arch`` ("llama" or "qwen2") with
    random weights drawn from ``seed``, sized for :func:`tiny_tokenizer`'s vocabulary.

    Float32, so incremental and one-shot forward passes agree to about 1e-5.
    """
    import mlx.core as mx
    from mlx.utils import tree_map

    if vocab_size is None:
        vocab_size = len(tiny_tokenizer().get_vocab())
    common = dict(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab_size,
        rope_theta=10000.0,
    )
    if arch == "llama":
        from mlx_lm.models import llama as module

        args = module.ModelArgs(model_type="llama", tie_word_embeddings=True, **common)
    elif arch == "qwen2":
        from mlx_lm.models import qwen2 as module

        args = module.ModelArgs(model_type="qwen2", tie_word_embeddings=False, **common)
    else:
        raise ValueError(f"arch: expected 'llama' or 'qwen2', got {arch!r}")
    mx.random.seed(seed)
    model = module.Model(args)
    # Default inits give near-uniform logits; scale up so greedy choices are decisive
    # and do not hinge on float rounding.
    model.update(tree_map(lambda p: p * 4.0 if p.ndim == 2 else p, model.parameters()))
    mx.eval(model.parameters())
    return model


def successor_model(vocab_size: int, successors, default: int):
    """A scripted stand-in for an ``mlx_lm`` model: after token ``t`` is fed it predicts
    ``successors.get(t, default)`` with certainty (one-hot logits, so greedy decoding
    follows the script exactly, whatever the positions or the mask).

    It keeps a real KV cache through mlx-lm's protocol (``make_mask``,
    ``update_and_fetch``), so a decoder drives it as it drives a real model. With it,
    schedules, word boundaries, EOS handling and limits can be tested with no
    floating-point decision."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size: expected an int >= 1, got {vocab_size!r}")

    def check(name: str, token) -> int:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ValueError(f"{name}: expected a token id in [0, {vocab_size}), got {token!r}")
        return token

    table = [check("default", default)] * vocab_size
    for a, b in dict(successors).items():
        table[check("successors key", a)] = check(f"successors[{a}]", b)
    return _successor_class()(table)


@cache
def _successor_class():
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.cache import KVCache

    class SuccessorLM(nn.Module):
        def __init__(self, table: list[int]):
            super().__init__()
            self.successor = mx.array(table, dtype=mx.int32)
            self.vocab_size = len(table)

        def make_cache(self):
            return [KVCache()]

        def __call__(self, inputs, cache=None):
            n = inputs.shape[1]
            if cache is not None:
                cache[0].make_mask(n, return_array=False, window_size=None)  # as mlx-lm models ask
                kv = mx.zeros((inputs.shape[0], 1, n, 1))  # one row per input row
                cache[0].update_and_fetch(kv, kv)
            hot = self.successor[inputs][..., None] == mx.arange(self.vocab_size)
            return hot.astype(mx.float32) * 20.0

    return SuccessorLM


def permute_for_interleaved_rope(weight, n_heads: int):
    """Reorder the rows of a Q or K projection (shape (n_heads * head_dim, hidden)) the
    way llama.cpp's converter does for llama models: within each head, the rotary pairs
    (i, i + head_dim/2) of the half-split convention become neighbours (2i, 2i+1), the
    layout of interleaved ("traditional") RoPE."""
    import numpy as np

    weight = np.asarray(weight)
    rows = weight.shape[0]
    halves = weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path, arch: str = "llama", seed: int = 0, tensor_type: str = "F32"):
    """Write :func:`tiny_model` ``(arch, seed)`` and :func:`tiny_tokenizer` as a GGUF file
    laid out like llama.cpp's converter writes one, and return its path.

    ``tensor_type``: "F32", or a ``gguf.quants`` format with a NumPy quantizer ("Q8_0",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1") for the 2-D weights (norms stay F32). llama models
    get their Q/K rows permuted for interleaved RoPE (:func:`permute_for_interleaved_rope`),
    as real llama GGUF files have. The file is written to a temporary name, then renamed.
    """
    import json
    import os
    from pathlib import Path

    import gguf
    import numpy as np
    from mlx.utils import tree_flatten

    from simulref.gguf import gguf_name

    if tensor_type != "F32" and tensor_type not in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        raise ValueError(f"tensor_type: expected F32, Q8_0, Q4_0, Q4_1, Q5_0 or Q5_1, "
                         f"got {tensor_type!r}")
    path = Path(path)
    model, tokenizer = tiny_model(arch, seed), tiny_tokenizer()
    args = model.args
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    backend = json.loads(tokenizer._tokenizer.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]

    temporary = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(temporary, arch)
    writer.add_name(f"tiny-{arch}-{seed}")
    writer.add_block_count(args.num_hidden_layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(args.hidden_size)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_attention_heads)
    writer.add_head_count_kv(args.num_key_value_heads)
    writer.add_rope_dimension_count(args.hidden_size // args.num_attention_heads)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([
        gguf.TokenType.CONTROL if t in CHATML_SPECIAL_TOKENS else gguf.TokenType.NORMAL
        for t in tokens
    ])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    heads = {"q_proj": args.num_attention_heads, "k_proj": args.num_key_value_heads}
    for name, value in tree_flatten(model.parameters()):
        weight = np.array(value, dtype=np.float32)
        projection = name.split(".")[-2]
        if arch == "llama" and projection in heads and name.endswith(".weight"):
            weight = permute_for_interleaved_rope(weight, heads[projection])
        if tensor_type != "F32" and weight.ndim == 2:
            qtype = gguf.GGMLQuantizationType[tensor_type]
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(weight, qtype),
                              raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), weight)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
