"""GGUF reading, weight formats, name/config mapping and tokenizer, held against the
``gguf`` package (GGUFReader, gguf.quants) and the tiny models they were written from."""

from __future__ import annotations

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_map
from tiny_gguf import permute_for_interleaved_rope, write_tiny_gguf

from simulref import gguf as sg
from simulref.testing import CHATML_TEMPLATE, tiny_model, tiny_tokenizer

SIMPLE_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
SENTENCE = "The weather is nice today, so we are going to walk in the park."


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """GGUF files of the tiny models, by (arch, tensor type)."""
    directory = tmp_path_factory.mktemp("gguf")
    return {
        (arch, kind): write_tiny_gguf(directory / f"{arch}-{kind}.gguf", arch, 0, kind)
        for arch in ("llama", "qwen2")
        for kind in ("F32", "Q8_0", "Q4_0")
    }


def logits(model, text=SENTENCE):
    ids = mx.array([tiny_tokenizer().encode(text)])
    return np.array(model(ids).astype(mx.float32))


def round_tripped(model, tensor_type):
    """``model`` with every 2-D weight passed through ggml quantization and back: what a
    GGUF file of that type holds."""
    qtype = gguf.GGMLQuantizationType[tensor_type]

    def through_ggml(weight):
        if weight.ndim != 2:
            return weight
        raw = gguf.quants.quantize(np.array(weight), qtype)
        return mx.array(gguf.quants.dequantize(raw, qtype))

    model.update(tree_map(through_ggml, model.parameters()))
    return model


# ------------------------------------------------------------------------- header


@pytest.mark.parametrize("key", [("llama", "F32"), ("qwen2", "Q4_0")])
def test_read_gguf_agrees_with_gguf_reader(tiny_files, key):
    path = tiny_files[key]
    ours, theirs = sg.read_gguf(path), gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == expected
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for tensor in theirs.tensors:
        info = ours.tensors[tensor.name]
        assert info.shape == tuple(int(d) for d in reversed(tensor.shape))
        assert (info.qtype, info.offset, info.nbytes) == (
            tensor.tensor_type, tensor.data_offset, tensor.n_bytes
        )
        assert np.array_equal(ours.raw(tensor.name).reshape(-1),
                              np.asarray(tensor.data).view(np.uint8).reshape(-1))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(sg.GGUFError, match="not a GGUF file"):
        sg.read_gguf(path)


@pytest.mark.parametrize("keep", [30, 2000, 0.5, 0.999])
def test_truncated_gguf_file(tiny_files, tmp_path, keep):
    data = tiny_files[("llama", "F32")].read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    with pytest.raises(sg.GGUFError, match="truncated"):
        sg.read_gguf(path)


# ------------------------------------------------------------------ weight formats


def random_blocks(rng, qtype_name, rows, blocks_per_row):
    """Random raw blocks: every level pattern possible, scales finite float16."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype_name]]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, size), dtype=np.uint8)
    halves = 2 if qtype_name in ("Q4_1", "Q5_1") else 1  # d, and m where there is one
    scales = rng.normal(0, 0.1, size=(rows, blocks_per_row, halves)).astype("<f2")
    raw[..., : 2 * halves] = scales.view(np.uint8).reshape(rows, blocks_per_row, 2 * halves)
    return raw.reshape(rows, -1)


@settings(max_examples=30, deadline=None)
@given(
    qtype_name=st.sampled_from(SIMPLE_TYPES),
    rows=st.integers(1, 4),
    blocks_per_row=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_affine_blocks_equal_gguf_dequantize(qtype_name, rows, blocks_per_row, seed):
    raw = random_blocks(np.random.default_rng(seed), qtype_name, rows, blocks_per_row)
    blocks = sg.affine_blocks(raw, qtype_name)
    ours = (blocks.q.reshape(rows, blocks_per_row, 32) * blocks.scales[..., None]
            + blocks.biases[..., None]).reshape(rows, -1)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype_name])
    assert blocks.q.max() < 2**blocks.bits
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 5, 6, 8]),
    rows=st.integers(1, 5),
    groups=st.integers(1, 4),
    chunk_values=st.sampled_from([1, 64, 1 << 22]),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_bits_is_mlx_layout(bits, rows, groups, chunk_values, seed):
    q = np.random.default_rng(seed).integers(0, 2**bits, size=(rows, 32 * groups),
                                             dtype=np.uint8)
    ones = mx.ones((rows, groups), dtype=mx.float32)
    packed = sg.pack_bits(q, bits, chunk_values=chunk_values)
    unpacked = mx.dequantize(mx.array(packed), ones, mx.zeros_like(ones),
                             group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(unpacked), q.astype(np.float32))


@pytest.mark.parametrize("qtype_name", SIMPLE_TYPES + ("Q4_K", "Q6_K"))
@pytest.mark.parametrize("dtype", ["float32", "quantized"])
def test_tensor_to_mlx_values(qtype_name, dtype):
    """Float modes dequantize like gguf.quants; quantized mode keeps the simple formats
    bit-exact (within float16 scales) and K-quants close."""
    qtype = gguf.GGMLQuantizationType[qtype_name]
    rng = np.random.default_rng(1)
    if qtype_name in SIMPLE_TYPES:
        raw = random_blocks(rng, qtype_name, 8, 8)
    else:  # no NumPy quantizer for K-quants: random bytes, then finite super-scales
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(8, size), dtype=np.uint8)
        at = {"Q4_K": [0, 2], "Q6_K": [size - 2]}[qtype_name]
        for offset in at:
            raw[:, offset : offset + 2] = (
                rng.normal(0, 0.01, size=(8, 1)).astype("<f2").view(np.uint8)
            )
    info = sg.TensorInfo("w", (8, raw.shape[1] // gguf.GGML_QUANT_SIZES[qtype][1]
                               * gguf.GGML_QUANT_SIZES[qtype][0]), int(qtype), 0, raw.size)
    expected = gguf.quants.dequantize(raw, qtype)
    params = sg.tensor_to_mlx(raw, info, dtype)
    if dtype == "float32":
        np.testing.assert_allclose(np.array(params["weight"]), expected, rtol=1e-6, atol=1e-6)
        return
    values = np.array(mx.dequantize(params["weight"], params["scales"], params["biases"],
                                    group_size=params["group_size"], bits=params["bits"]))
    scale = np.abs(expected).max()
    tolerance = 1e-3 if qtype_name in SIMPLE_TYPES else 0.1
    np.testing.assert_allclose(values, expected, atol=tolerance * scale)


# ------------------------------------------------------------------ names and config


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_names_are_a_bijection_onto_model_parameters(arch):
    names = [name for name, _ in tree_flatten(tiny_model(arch).parameters())]
    gguf_names = [sg.gguf_name(name) for name in names]
    assert len(set(gguf_names)) == len(names)
    assert [sg.mlx_name(name) for name in gguf_names] == names


@given(layer=st.integers(0, 200), part=st.sampled_from(sorted(sg._BLOCK_PARTS)),
       kind=st.sampled_from(["weight", "bias"]))
def test_block_names_round_trip(layer, part, kind):
    name = f"blk.{layer}.{part}.{kind}"
    assert sg.gguf_name(sg.mlx_name(name)) == name


@pytest.mark.parametrize(
    "name", ["rope_freqs.weight", "blk.0.attn_qkv.weight", "blk.x.attn_q.weight"]
)
def test_unknown_tensor_names(name):
    with pytest.raises(sg.GGUFError, match="no mlx-lm counterpart"):
        sg.mlx_name(name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_config_matches_the_model_written(tiny_files, arch):
    file = sg.read_gguf(tiny_files[(arch, "F32")])
    config = sg.model_config(file.metadata, file.tensors)
    args = tiny_model(arch).args
    for field in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "rope_theta", "tie_word_embeddings"):
        assert config[field] == getattr(args, field), field
    assert config["rms_norm_eps"] == pytest.approx(args.rms_norm_eps)
    assert config["rope_traditional"] is (arch == "llama")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(sg.GGUFError, match="'mamba'.*supported: llama, qwen2"):
        sg.load_gguf(path)


# ------------------------------------------------------------ the model, end to end


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_gguf_reproduces_the_tiny_model(tiny_files, arch):
    """The mapping is right: same logits as the model the file was written from
    (for llama that includes un-doing the converter's Q/K permutation via
    interleaved RoPE)."""
    model, _ = sg.load_gguf(tiny_files[(arch, "F32")], "float32")
    np.testing.assert_allclose(logits(model), logits(tiny_model(arch)), atol=1e-4)


def test_llama_permutation_needs_traditional_rope(tiny_files):
    """Without interleaved RoPE the permuted Q/K of a llama GGUF give other logits: the
    equivalence above really checks the permutation handling."""
    model, _ = sg.load_gguf(tiny_files[("llama", "F32")], "float32")
    for layer in model.model.layers:
        layer.self_attn.rope.traditional = False
    assert np.abs(logits(model) - logits(tiny_model("llama"))).max() > 1e-2


@pytest.mark.parametrize("tensor_type", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_gguf_reproduces_round_tripped_weights(tiny_files, arch, tensor_type):
    expected = logits(round_tripped(tiny_model(arch), tensor_type))
    model, _ = sg.load_gguf(tiny_files[(arch, tensor_type)], "float32")
    np.testing.assert_allclose(logits(model), expected, atol=1e-4)

    # dtype="quantized": MLX quantized weights holding exactly the file's values ...
    quantized, _ = sg.load_gguf(tiny_files[(arch, tensor_type)], "quantized")
    reference = dict(tree_flatten(round_tripped(tiny_model(arch), tensor_type).parameters()))
    heads = {"q_proj": 4, "k_proj": 2}  # tiny_model's attention heads
    layers = [(n, m) for n, m in quantized.named_modules()
              if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert len(layers) == 7 * 2 + 1 + (arch == "qwen2")  # every matrix, lm_head if untied
    for name, layer in layers:
        values = mx.dequantize(layer.weight, layer.scales, layer.biases,
                               group_size=layer.group_size, bits=layer.bits)
        want = np.array(reference[f"{name}.weight"])
        if arch == "llama" and name.split(".")[-1] in heads:
            want = permute_for_interleaved_rope(want, heads[name.split(".")[-1]])
        np.testing.assert_allclose(np.array(values.astype(mx.float32)), want,
                                   atol=1e-3 * np.abs(want).max())
    # ... computing in quantized_float_dtype() (float16 on a GPU), so logits agree to
    # that precision
    got = logits(quantized)
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtypes(tiny_files, dtype):
    model, _ = sg.load_gguf(tiny_files[("qwen2", "F32")], dtype)
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {getattr(mx, dtype)}
    expected = logits(tiny_model("qwen2"))
    assert np.abs(logits(model) - expected).max() < 0.05 * np.abs(expected).max()


def test_bad_dtype(tiny_files):
    with pytest.raises(ValueError, match="dtype: expected one of"):
        sg.load_gguf(tiny_files[("llama", "F32")], "int8")


# ------------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def gguf_tokenizer(tiny_files):
    return sg.tokenizer_from_metadata(sg.read_gguf(tiny_files[("llama", "F32")]).metadata)


TEXT = st.lists(
    st.sampled_from(list("aeiouéè ltnsrTW'.,!?\n0123456789-") +
                    ["<|im_start|>", "<|im_end|>", "<|endoftext|>", " the", "ü", "😀", "  "]),
    max_size=40,
).map("".join)


@settings(max_examples=60, deadline=None)
@given(text=TEXT)
def test_gguf_tokenizer_encodes_like_the_original(gguf_tokenizer, text):
    original = tiny_tokenizer()
    assert gguf_tokenizer.encode(text) == original.encode(text)
    assert gguf_tokenizer.decode(gguf_tokenizer.encode(text)) == text


def test_gguf_tokenizer_wrapper(gguf_tokenizer):
    original = tiny_tokenizer()
    im_end = original.convert_tokens_to_ids("<|im_end|>")
    assert im_end in gguf_tokenizer.eos_token_ids
    assert gguf_tokenizer.eos_token_id == im_end
    assert gguf_tokenizer.chat_template == CHATML_TEMPLATE
    messages = [{"role": "system", "content": "Translate"}, {"role": "user", "content": "Hi"}]
    assert gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True) == \
        original.apply_chat_template(messages, add_generation_prompt=True)
    # control tokens are special: skipped on request
    ids = gguf_tokenizer.encode("<|im_start|>user")
    assert gguf_tokenizer.decode(ids, skip_special_tokens=True) == "user"
    # the streaming detokenizer rebuilds the text
    detokenizer = gguf_tokenizer.detokenizer
    detokenizer.reset()
    for token in gguf_tokenizer.encode("Il fait beau, 42 fois."):
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == "Il fait beau, 42 fois."


@pytest.mark.parametrize(
    ("pre", "text", "pieces"),
    [
        ("gpt2", "abc 12345 x", ["abc", "Ġ12345", "Ġx"]),
        ("smollm", "abc 12345", ["abc", "Ġ", "1", "2", "3", "4", "5"]),
        ("qwen2", "abc 12345", ["abc", "Ġ", "1", "2", "3", "4", "5"]),
        ("llama-bpe", "abc 12345", ["abc", "Ġ", "123", "45"]),
        ("qwen2", "Hello\n\n  world", ["Hello", "ĊĊ", "Ġ", "Ġworld"]),
        ("qwen2", "it's ok", ["it", "'s", "Ġok"]),
    ],
)
def test_pre_tokenizers(pre, text, pieces):
    split = sg.pre_tokenizer(pre).pre_tokenize_str(text)
    assert [piece for piece, _ in split] == pieces


def test_unsupported_pre_tokenizer_and_model():
    with pytest.raises(sg.GGUFError, match="pre-tokenizer 'falcon'.*qwen2"):
        sg.pre_tokenizer("falcon")
    with pytest.raises(sg.GGUFError, match="tokenizer model 'llama'"):
        sg.tokenizer_from_metadata({"tokenizer.ggml.model": "llama"})


def test_permutation_pairs_rotary_halves():
    """Row i of a head moves next to its rotary partner i + head_dim/2."""
    head_dim, heads = 8, 2
    rows = np.arange(heads * head_dim)[:, None].repeat(3, axis=1)
    permuted = permute_for_interleaved_rope(rows, heads)[:, 0]
    assert permuted[:head_dim].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert permuted[head_dim:].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"llama.rope.scaling.type": "yarn"}, "RoPE scaling 'yarn'"),
        ({"llama.rope.dimension_count": 8}, "partial rotary"),
        ({"llama.attention.head_count_kv": [2, 2]}, "per-layer head counts"),
        ({"llama.block_count": None}, "lacks llama.block_count"),
    ],
)
def test_model_config_refuses_what_it_cannot_map(tiny_files, change, message):
    file = sg.read_gguf(tiny_files[("llama", "F32")])
    metadata = {**file.metadata, **change}
    with pytest.raises(sg.GGUFError, match=message):
        sg.model_config(metadata, file.tensors)
