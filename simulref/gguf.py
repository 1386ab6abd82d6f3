"""GGUF files as ``mlx_lm`` models and tokenizers.

A GGUF file holds everything a model needs: hyper-parameters and a byte-level BPE
tokenizer as key/value metadata, weights as (often quantized) tensors. This module
turns one into the pair ``mlx_lm.load`` returns, for the architectures ``mlx_lm``
models as ``llama`` and ``qwen2``.

Pieces, each testable alone:

* :func:`read_gguf` parses the header itself (``gguf.GGUFReader`` needs ~9 s for the
  150k-entry vocabulary of Qwen; this needs ~0.3 s). Tests hold it against GGUFReader.
* :func:`affine_blocks` splits the simple block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
  into integer levels, a scale and a bias per 32 values. That is exactly MLX's affine
  quantization with ``group_size=32``, so ``dtype="quantized"`` keeps them bit-exact,
  and the float modes dequantize them with vectorized MLX ops (``gguf.quants`` takes
  ~14 s for Qwen 0.5B in NumPy). Other formats (K-quants, IQ*, ...) go through
  ``gguf.quants.dequantize``; tests hold :func:`affine_blocks` against it.
* :func:`model_config` and :func:`mlx_name` map metadata and tensor names onto
  ``mlx_lm.models.llama`` / ``qwen2``. llama.cpp's converter permutes the rows of Q and K
  of llama models for interleaved ("traditional") RoPE and leaves qwen2 as is, so
  ``rope_traditional`` follows the architecture.
* :func:`tokenizer_from_metadata` rebuilds the tokenizer with the ``tokenizers`` library.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import DTYPES  # noqa: F401 - one home for the names

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


# llama.cpp's converter permutes Q/K rows of llama models so that ggml's interleaved RoPE
# applies; it writes qwen2 unpermuted (ggml's NEOX RoPE, MLX's non-traditional one).
ROPE_TRADITIONAL = {"llama": True, "qwen2": False}

GROUP_SIZE = 32  # every simple GGUF block format quantizes 32 values with one scale

# dtype="quantized" for formats that are not an affine 32-block: requantize with MLX
# (group size 32) at about the source's precision (K-quants use 32-value sub-blocks, so
# 4/5-bit K-quants survive almost unchanged); other quantized formats get 8 bits. Float
# weights get mlx-lm's own default, 4 bits with group size 64.
REQUANT_BITS = {"Q2_K": 4, "Q3_K": 4, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}
DEFAULT_REQUANT_BITS = 8
FLOAT_QUANT_BITS, FLOAT_QUANT_GROUP_SIZE = 4, 64
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")

# Key/value types of the GGUF format.
_SCALAR = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a GGUF file this module can read (corrupt, truncated, unsupported)."""


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # NumPy (row-major) order: ggml's dimensions reversed
    qtype: int  # a gguf.GGMLQuantizationType value
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]

    def raw(self, name: str) -> np.ndarray:
        """The bytes of tensor ``name`` as a read-only uint8 array (rows, bytes per row)."""
        info = self.tensors[name]
        data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.offset,
                         shape=(info.nbytes,))
        rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        return data.reshape(rows, info.nbytes // rows)


class _Cursor:
    """Reads little-endian GGUF values from a buffer; any overrun is a truncated file."""

    def __init__(self, buffer, path: Path):
        self.buffer, self.pos, self.path = buffer, 0, path

    def scalar(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buffer):
            raise GGUFError(f"{self.path}: truncated GGUF header at byte {self.pos}")
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        end = self.pos + length
        if end > len(self.buffer):
            raise GGUFError(f"{self.path}: truncated GGUF header at byte {self.pos}")
        try:
            text = bytes(self.buffer[self.pos : end]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{self.path}: invalid UTF-8 string at byte {self.pos}") from exc
        self.pos = end
        return text

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in _SCALAR:  # one NumPy read instead of `count` struct calls
                dtype = np.dtype(_SCALAR[item_type])
                end = self.pos + count * dtype.itemsize
                if end > len(self.buffer):
                    raise GGUFError(f"{self.path}: truncated GGUF header at byte {self.pos}")
                items = np.frombuffer(self.buffer, dtype, count, self.pos).tolist()
                self.pos = end
                return items
            return [self.value(item_type) for _ in range(count)]
        raise GGUFError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of the GGUF file at ``path`` (metadata and tensor table).

    Raises :class:`GGUFError` (a ValueError) for anything that is not a complete GGUF
    file, including tensor data that would run past the end of the file.
    """
    import gguf

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (expected the magic bytes 'GGUF')")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            cursor = _Cursor(buffer, path)
            cursor.pos = 4
            version = cursor.scalar("<I")
            if version not in (2, 3):
                raise GGUFError(f"{path}: unsupported GGUF version {version} (expected 2 or 3)")
            n_tensors, n_kv = cursor.scalar("<Q"), cursor.scalar("<Q")
            metadata = {}
            for _ in range(n_kv):
                key = cursor.string()
                metadata[key] = cursor.value(cursor.scalar("<I"))
            table = []
            for _ in range(n_tensors):
                name = cursor.string()
                dims = [cursor.scalar("<Q") for _ in range(cursor.scalar("<I"))]
                table.append((name, tuple(reversed(dims)), cursor.scalar("<I"),
                              cursor.scalar("<Q")))
            alignment = metadata.get("general.alignment", 32)
            data_start = -(-cursor.pos // alignment) * alignment

    tensors = {}
    for name, shape, qtype, relative in table:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        except (ValueError, KeyError) as exc:
            raise GGUFError(f"{path}: tensor {name!r} has unknown type {qtype}") from exc
        count = int(np.prod(shape, dtype=np.int64))
        if shape and shape[-1] % block:
            raise GGUFError(f"{path}: tensor {name!r} row of {shape[-1]} is not whole blocks")
        info = TensorInfo(name, shape, qtype, data_start + relative, count // block * type_size)
        if info.offset + info.nbytes > size:
            raise GGUFError(
                f"{path}: truncated GGUF file: tensor {name!r} ends at byte "
                f"{info.offset + info.nbytes}, the file has {size} bytes"
            )
        tensors[name] = info
    return GGUFFile(path, version, metadata, tensors)


# ------------------------------------------------------------------ weight formats


@dataclass(frozen=True)
class AffineBlocks:
    """Values ``q * scale + bias`` per 32-value block: MLX's affine quantization."""

    q: np.ndarray  # uint8 levels, shape (rows, cols)
    scales: np.ndarray  # float32, shape (rows, cols // 32)
    biases: np.ndarray  # float32, shape (rows, cols // 32)
    bits: int


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., start : start + 2]).view("<f2")[..., 0].astype(
        np.float32
    )


def _nibbles(qs: np.ndarray) -> np.ndarray:
    # ggml packs value j of a block in the low nibble of byte j and value j+16 in its high one
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(blocks: np.ndarray, start: int) -> np.ndarray:
    # bit j of the little-endian uint32 `qh` is the fifth bit of value j
    qh = np.ascontiguousarray(blocks[..., start : start + 4])
    return np.unpackbits(qh, axis=-1, bitorder="little") << np.uint8(4)


def affine_blocks(raw: np.ndarray, qtype_name: str) -> AffineBlocks:
    """Split raw ggml blocks (uint8, shape (rows, bytes per row)) of a simple format into
    levels, scales and biases. Only Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 are affine blocks."""
    sizes = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}
    if qtype_name not in sizes:
        raise ValueError(f"qtype_name: expected one of {sorted(sizes)}, got {qtype_name!r}")
    raw = np.asarray(raw, dtype=np.uint8)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, sizes[qtype_name])
    d = _f16(blocks, 0)
    if qtype_name == "Q8_0":
        # int8 x as unsigned x + 128: flipping the sign bit is that addition mod 256
        q, bias, bits = blocks[..., 2:] ^ np.uint8(0x80), -128.0 * d, 8
    elif qtype_name == "Q4_0":
        q, bias, bits = _nibbles(blocks[..., 2:]), -8.0 * d, 4
    elif qtype_name == "Q4_1":
        q, bias, bits = _nibbles(blocks[..., 4:]), _f16(blocks, 2), 4
    elif qtype_name == "Q5_0":
        q, bias, bits = _nibbles(blocks[..., 6:]) | _fifth_bits(blocks, 2), -16.0 * d, 5
    else:  # Q5_1
        q, bias, bits = _nibbles(blocks[..., 8:]) | _fifth_bits(blocks, 4), _f16(blocks, 2), 5
    return AffineBlocks(q.reshape(rows, -1), d, bias.astype(np.float32), bits)


def pack_bits(q: np.ndarray, bits: int, *, chunk_values: int = 1 << 22) -> np.ndarray:
    """Pack levels (uint8, shape (rows, cols), cols a multiple of 32) the way MLX does:
    one little-endian bit stream per row, ``bits`` bits per value, as uint32 words.
    Rows are packed about ``chunk_values`` values at a time."""
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"bits: expected one of 2, 3, 4, 5, 6, 8, got {bits!r}")
    q = np.ascontiguousarray(q, dtype=np.uint8)
    rows = q.shape[0]
    if bits == 8:
        return q.view("<u4").reshape(rows, -1)
    # 8 values of `bits` bits fill exactly `bits` bytes; a few rows at a time, since the
    # uint64 temporaries are 8x the levels (1 GB for Qwen's embedding at once)
    shifts = np.arange(8, dtype=np.uint64) * bits
    packed = np.empty((rows, q.shape[1] * bits // 8), dtype=np.uint8)
    step = max(1, chunk_values // max(1, q.shape[1]))
    for start in range(0, rows, step):
        eights = q[start : start + step].reshape(-1, q.shape[1] // 8, 8).astype(np.uint64)
        stream = np.bitwise_or.reduce(eights << shifts, axis=-1).astype("<u8")
        chunk = stream.view(np.uint8).reshape(*stream.shape, 8)[..., :bits]
        packed[start : start + step] = chunk.reshape(chunk.shape[0], -1)
    return packed.view("<u4")


def dequantize_numpy(raw: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Float32 values of any tensor type, via ``gguf.quants`` (the slow, general path)."""
    import gguf

    qtype = gguf.GGMLQuantizationType(info.qtype)
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.asarray(raw).view("<f4").reshape(info.shape)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.asarray(raw).view("<f2").astype(np.float32).reshape(info.shape)
    return gguf.quants.dequantize(np.asarray(raw), qtype).reshape(info.shape)


def quantized_float_dtype():
    """Float dtype of scales, biases and unquantized weights for ``dtype="quantized"``:
    float16 on a GPU; float32 on the CPU, where MLX's float16 kernels are ~30x slower
    (measured, SmolLM2-135M decode: 0.2 vs 6.6 tokens/s). Both hold ggml's float16
    block scales exactly."""
    import mlx.core as mx

    return mx.float16 if mx.default_device().type == mx.DeviceType.gpu else mx.float32


def tensor_to_mlx(raw: np.ndarray, info: TensorInfo, dtype: str) -> dict[str, Any]:
    """One GGUF tensor as MLX parameters: ``{"weight": ...}`` in a float dtype, or for
    ``dtype="quantized"`` and a 2-D weight ``{"weight", "scales", "biases", "bits",
    "group_size"}`` (floats in :func:`quantized_float_dtype`)."""
    import gguf
    import mlx.core as mx

    qname = gguf.GGMLQuantizationType(info.qtype).name
    affine = qname in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
    if qname in _FLOAT_TYPES:
        bits, group_size = FLOAT_QUANT_BITS, FLOAT_QUANT_GROUP_SIZE
    else:
        bits, group_size = REQUANT_BITS.get(qname, DEFAULT_REQUANT_BITS), GROUP_SIZE
    if dtype == "quantized" and len(info.shape) == 2 and info.shape[-1] % group_size == 0:
        if affine:
            blocks = affine_blocks(raw, qname)
            weight = mx.array(pack_bits(blocks.q, blocks.bits))
            scales, biases, bits = mx.array(blocks.scales), mx.array(blocks.biases), blocks.bits
        else:
            weight, scales, biases = mx.quantize(
                mx.array(dequantize_numpy(raw, info)), group_size=group_size, bits=bits
            )
        half = quantized_float_dtype()
        return {"weight": weight, "scales": scales.astype(half), "biases": biases.astype(half),
                "bits": bits, "group_size": group_size}
    target = quantized_float_dtype() if dtype == "quantized" else getattr(mx, dtype)
    if affine:
        blocks = affine_blocks(raw, qname)
        levels = mx.array(blocks.q).reshape(*blocks.scales.shape, GROUP_SIZE)
        values = levels.astype(mx.float32) * mx.array(blocks.scales)[..., None] + mx.array(
            blocks.biases
        )[..., None]
        return {"weight": values.reshape(info.shape).astype(target)}
    return {"weight": mx.array(dequantize_numpy(raw, info)).astype(target)}


# ------------------------------------------------------------------ names and config

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_PARTS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(\w+\.?\w*)\.(weight|bias)")


def mlx_name(name: str) -> str:
    """The ``mlx_lm`` llama/qwen2 parameter name of GGUF tensor ``name``."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _BLOCK_NAME.fullmatch(name)
    if match and match[2] in _BLOCK_PARTS:
        return f"model.layers.{match[1]}.{_BLOCK_PARTS[match[2]]}.{match[3]}"
    raise GGUFError(
        f"tensor {name!r} has no mlx-lm counterpart; known: {sorted(_TOP_LEVEL)} and "
        f"blk.N.{{{','.join(_BLOCK_PARTS)}}}.weight/.bias"
    )


def gguf_name(name: str) -> str:
    """Inverse of :func:`mlx_name` (used to write GGUF files from MLX models)."""
    for gguf_key, mlx_key in _TOP_LEVEL.items():
        if name == mlx_key:
            return gguf_key
    match = _LAYER_NAME.fullmatch(name)
    parts = {v: k for k, v in _BLOCK_PARTS.items()}
    if match and match[2] in parts:
        return f"blk.{match[1]}.{parts[match[2]]}.{match[3]}"
    raise ValueError(f"name: not an mlx-lm llama/qwen2 parameter name: {name!r}")


def model_config(metadata: dict[str, Any], tensors: dict[str, TensorInfo]) -> dict[str, Any]:
    """``mlx_lm`` ModelArgs fields for a GGUF file's metadata and tensor table."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"unsupported GGUF architecture {arch!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"GGUF metadata lacks {arch}.{key}")
        return value

    hidden, heads = get("embedding_length"), get("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    if not isinstance(heads, int) or not isinstance(kv_heads, int):
        raise GGUFError("per-layer head counts are not supported")
    head_dim = get("attention.key_length", hidden // heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError("partial rotary embeddings (rope.dimension_count < head size) "
                        "are not supported")
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise GGUFError(f"RoPE scaling {scaling!r} is not supported")
    if "token_embd.weight" not in tensors:
        raise GGUFError("GGUF file has no token_embd.weight tensor")
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length"),
        "rope_traditional": ROPE_TRADITIONAL[arch],
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if arch == "llama":
        config["head_dim"] = head_dim
    elif head_dim != hidden // heads:
        raise GGUFError(f"{arch}: head size {head_dim} != hidden size / heads")
    return config


# ------------------------------------------------------------------------ tokenizer

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (those of the models' own
# tokenizer.json files; llama.cpp keys them by the same names).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = ("gpt2", "smollm", "qwen2", "llama-bpe")

_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType


def pre_tokenizer(pre: str):
    """The ``tokenizers`` pre-tokenizer for GGUF ``tokenizer.ggml.pre`` value ``pre``."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "gpt2":  # GPT-2's own split regex is ByteLevel's built-in one
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # GPT-2 split with every digit on its own
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in ("qwen2", "llama-bpe"):
        pattern = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            byte_level,
        ])
    raise GGUFError(
        f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(PRE_TOKENIZERS)}"
    )


def tokenizer_from_metadata(metadata: dict[str, Any]):
    """An ``mlx_lm`` TokenizerWrapper around a PreTrainedTokenizerFast rebuilt from GGUF
    tokenizer metadata (byte-level BPE, ``tokenizer.ggml.model == "gpt2"`` only)."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(
            f"unsupported GGUF tokenizer model {kind!r}; supported: 'gpt2' (byte-level BPE)"
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")

    bpe = Tokenizer(models.BPE(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=merges,
        ignore_merges=pre == "llama-bpe",  # Llama 3 looks whole words up before merging
    ))
    bpe.pre_tokenizer = pre_tokenizer(pre)
    bpe.decoder = decoders.ByteLevel()
    # Control tokens are "special" (skipped when decoding with skip_special_tokens);
    # user-defined ones (Qwen's <tool_call>) are matched whole but decoded as text.
    bpe.add_tokens([
        AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
        for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)
    ])

    def token(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_id = tokens.index(bos)
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos,
        eos_token=eos,
        unk_token=token("unknown"),
        pad_token=token("padding"),
        clean_up_tokenization_spaces=False,
        model_max_length=int(1e30),
    )
    hf.chat_template = metadata.get("tokenizer.chat_template")
    # Generation ends at EOS, at llama.cpp's end-of-turn ids, and at ChatML's <|im_end|>.
    stop_ids = {metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")}
    stop_ids.add(hf.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokens else None)
    stop_ids.discard(None)
    return TokenizerWrapper(hf, BPEStreamingDetokenizer, eos_token_ids=sorted(stop_ids))


# --------------------------------------------------------------------------- loading


def load_gguf(path: str | Path, dtype: str = "float32"):
    """Load the GGUF file at ``path`` as ``(model, tokenizer)`` like ``mlx_lm.load``.

    ``dtype``: "float32", "bfloat16", "float16" (weights dequantized), or "quantized"
    (MLX affine quantization, group size 32: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 kept bit-exact,
    K-quants requantized at about their own precision, see ``REQUANT_BITS``; float
    weights 4-bit, group size 64).
    """
    import importlib

    import mlx.core as mx
    import mlx.nn as nn

    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    file = read_gguf(path)
    config = model_config(file.metadata, file.tensors)
    tokenizer = tokenizer_from_metadata(file.metadata)
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))

    weights, quantized = {}, {}
    for name, info in file.tensors.items():
        target = mlx_name(name)
        params = tensor_to_mlx(file.raw(name), info, dtype)
        if "bits" in params:
            quantized[target.rsplit(".", 1)[0]] = {"group_size": params.pop("group_size"),
                                                   "bits": params.pop("bits")}
        prefix = target.rsplit(".", 1)[0]
        params = {target: params.pop("weight")} | {
            f"{prefix}.{key}": value for key, value in params.items()
        }
        mx.eval(list(params.values()))  # materialize now: peak memory is one tensor's temps
        mx.clear_cache()  # and hand those temps back instead of keeping them in MLX's cache
        weights.update(params)

    if quantized:
        nn.quantize(model, class_predicate=lambda path, _module: quantized.get(path, False))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model, tokenizer
