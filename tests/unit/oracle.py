"""A slow, obviously-correct forward pass for the tiny llama / qwen2 test models.

Written from the architecture's definition in NumPy float64, not from mlx-lm's forward:
explicit per-token position ids and an explicit boolean attention mask (True = the query
may attend to the key), the whole sequence at once, no cache. The decoder's incremental
logits are held against it.

Supports what the tiny models use: token embedding, RMSNorm, q/k/v projections (with
biases where the model has them, as qwen2 does), rotary embeddings (interleaved pairs when
``rope_traditional`` else rotate-half), grouped-query attention, SwiGLU MLP, tied or untied
output head.
"""

from __future__ import annotations

import numpy as np


def _matmul_t(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w.T with einsum's own loops: NumPy's threaded BLAS slows to a crawl on a busy
    2-core machine (30 ms instead of 0.5 ms for these sizes), and the sizes are tiny."""
    return np.einsum("...j,kj->...k", x, w)


def _np(array) -> np.ndarray:
    import mlx.core as mx

    return np.array(array.astype(mx.float32)).astype(np.float64)


class Oracle:
    def __init__(self, model):
        from mlx.utils import tree_flatten

        args = model.args
        if getattr(args, "rope_scaling", None):
            raise ValueError("oracle: rope_scaling is not supported")
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads or self.n_heads
        self.head_dim = getattr(args, "head_dim", None) or args.hidden_size // self.n_heads
        self.eps = args.rms_norm_eps
        self.theta = args.rope_theta
        self.traditional = getattr(args, "rope_traditional", False)
        self.tied = args.tie_word_embeddings
        self.n_layers = args.num_hidden_layers
        self.w = {name: _np(value) for name, value in tree_flatten(model.parameters())}

    def _rms(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def _linear(self, x, name):
        y = _matmul_t(x, self.w[name + ".weight"])
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def _rope(self, x, positions):
        # x: [heads, L, d]; rotate pairs of dimensions by angle position * theta^(-2i/d).
        d = self.head_dim
        inv_freq = self.theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
        angle = positions[:, None] * inv_freq[None, :]  # [L, d/2]
        cos, sin = np.cos(angle), np.sin(angle)
        if self.traditional:
            a, b = x[..., 0::2], x[..., 1::2]
        else:
            a, b = x[..., : d // 2], x[..., d // 2 :]
        ra, rb = a * cos - b * sin, a * sin + b * cos
        out = np.empty_like(x)
        if self.traditional:
            out[..., 0::2], out[..., 1::2] = ra, rb
        else:
            out[..., : d // 2], out[..., d // 2 :] = ra, rb
        return out

    def _attention(self, x, layer, positions, mask):
        p = f"model.layers.{layer}.self_attn."
        L = x.shape[0]
        q = self._linear(x, p + "q_proj").reshape(L, self.n_heads, self.head_dim)
        k = self._linear(x, p + "k_proj").reshape(L, self.n_kv_heads, self.head_dim)
        v = self._linear(x, p + "v_proj").reshape(L, self.n_kv_heads, self.head_dim)
        q = self._rope(q.transpose(1, 0, 2), positions)
        k = self._rope(k.transpose(1, 0, 2), positions)
        v = v.transpose(1, 0, 2)
        group = self.n_heads // self.n_kv_heads
        heads = []
        for h in range(self.n_heads):
            kv = h // group  # query head h shares key/value head h // group
            scores = _matmul_t(q[h], k[kv]) / np.sqrt(self.head_dim)
            scores = np.where(mask, scores, -np.inf)
            scores -= scores.max(axis=-1, keepdims=True)
            weights = np.exp(scores)
            weights /= weights.sum(axis=-1, keepdims=True)
            heads.append(_matmul_t(weights, v[kv].T))
        out = np.stack(heads, axis=1).reshape(L, self.n_heads * self.head_dim)
        return self._linear(out, p + "o_proj")

    def _mlp(self, x, layer):
        p = f"model.layers.{layer}.mlp."
        gate = self._linear(x, p + "gate_proj")
        silu = gate / (1.0 + np.exp(-gate))
        return self._linear(silu * self._linear(x, p + "up_proj"), p + "down_proj")

    def logits(self, tokens, positions, mask) -> np.ndarray:
        """Logits [L, vocab] for ``tokens`` at ``positions`` under ``mask`` [L, L]."""
        tokens = np.asarray(tokens, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.float64)
        mask = np.asarray(mask, dtype=bool)
        L = len(tokens)
        if positions.shape != (L,) or mask.shape != (L, L):
            raise ValueError(f"oracle: expected positions [{L}] and mask [{L}, {L}], got "
                             f"{positions.shape} and {mask.shape}")
        if not mask.diagonal().all():
            raise ValueError("oracle: every token must see itself")
        embed = self.w["model.embed_tokens.weight"]
        h = embed[tokens]
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            h = h + self._attention(self._rms(h, self.w[p + "input_layernorm.weight"]), layer,
                                    positions, mask)
            h = h + self._mlp(self._rms(h, self.w[p + "post_attention_layernorm.weight"]), layer)
        h = self._rms(h, self.w["model.norm.weight"])
        head = embed if self.tied else self.w["lm_head.weight"]
        return _matmul_t(h, head)


def causal(L: int) -> np.ndarray:
    return np.tril(np.ones((L, L), dtype=bool))


def layout_mask(is_target, layout: str) -> np.ndarray:
    """The mask a layout implies over slots in feeding order: causal, and in the group
    layout a source query never sees a target key."""
    is_target = np.asarray(is_target, dtype=bool)
    mask = causal(len(is_target))
    if layout == "group":
        mask &= is_target[:, None] | ~is_target[None, :]
    return mask


def layout_positions(is_target, layout: str, target_start: int) -> np.ndarray:
    """Positions of slots in feeding order: chronological (interleaved), or per group, the
    target group starting at ``target_start``."""
    is_target = np.asarray(is_target, dtype=bool)
    if layout != "group":
        return np.arange(len(is_target))
    n_target_before = np.cumsum(is_target) - is_target
    n_source_before = np.cumsum(~is_target) - ~is_target
    return np.where(is_target, target_start + n_target_before, n_source_before)


def budget_mask(n_source: int, budgets) -> np.ndarray:
    """The prefilled layout: ``n_source`` source slots (causal among themselves), then one
    target slot per budget; a target slot sees the first ``budget`` source slots and the
    target slots up to itself."""
    L = n_source + len(budgets)
    mask = causal(L)
    for i, budget in enumerate(budgets):
        mask[n_source + i, budget:n_source] = False
    return mask
