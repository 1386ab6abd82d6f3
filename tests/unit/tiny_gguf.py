"""Test fixture: :func:`write_tiny_gguf` writes a tiny model as a GGUF file laid out like
llama.cpp's converter writes one, so the tests can take the loader path a user's
``--model FILE.gguf`` takes. Moved here from ``simulref.testing`` (not public API).
Import it as ``from tiny_gguf import ...`` (pytest puts tests/unit on the path)."""

from __future__ import annotations

from simulref.testing import CHATML_SPECIAL_TOKENS, CHATML_TEMPLATE, tiny_model, tiny_tokenizer

__all__ = ["permute_for_interleaved_rope", "write_tiny_gguf"]


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
