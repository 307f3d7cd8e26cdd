"""The GPT network of the model card in Apple MLX, mirroring `nanogpt.model.gpt` line for line.

Same class names, same parameter names and shapes (`transformer.token_embedding.weight`,
`transformer.blocks.N.attn.qkv_proj.weight`, ...), same `ModelConfig`, so one `config.json` +
`model.safetensors` serves both backends. Linear weights are (out, in) in both frameworks, so tensors
move between them unchanged. With `tie_embeddings` there is no `lm_head` module at all: the head is
`token_embedding.as_linear`, so the parameter tree holds the shared matrix once (as the checkpoint does).

    model = NanoGPTLMHeadModel(preset("card"))
    logits = model(idx)  # idx (B, T) int32 -> logits (B, T, vocab_size)
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from nanogpt.config import ModelConfig
from nanogpt.mlx.kv_cache import KVCache

Linear = nn.Linear  # (out, in) weight, like torch.nn.Linear
LayerNorm = nn.LayerNorm  # weight (+ bias), eps as in torch


def causal_attention_with_dropout(q: mx.array, k: mx.array, v: mx.array, p: float) -> mx.array:
    """softmax(q k^T / sqrt(hs)) v with dropout on the attention weights, as torch's SDPA does in training.

    mx.fast.scaled_dot_product_attention has no dropout, so training with dropout > 0 takes this path.
    q (B, nh, Tq, hs), k/v (B, nh, Tk, hs); query i sees keys 0 .. Tk - Tq + i (lower-right causal).
    """
    Tq, Tk = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(0, 1, 3, 2)) * (q.shape[-1] ** -0.5)  # (B, nh, Tq, Tk)
    mask = mx.tril(mx.ones((Tq, Tk), dtype=mx.bool_), k=Tk - Tq)
    att = mx.softmax(mx.where(mask, scores, -mx.inf), axis=-1)
    # inverted dropout, the same rule as torch: keep with prob 1 - p, scale kept weights by 1 / (1 - p)
    keep = mx.random.bernoulli(1.0 - p, att.shape)
    att = mx.where(keep, att / (1.0 - p), 0.0)
    return att @ v


class NanoGPTAttention(nn.Module):
    """Causal multi-head self-attention with one fused QKV projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.out_proj = Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.p = cfg.dropout

    def __call__(self, x: mx.array, cache: KVCache | None = None, layer: int = 0) -> mx.array:
        B, T, C = x.shape
        q, k, v = mx.split(self.qkv_proj(x), 3, axis=-1)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.reshape(B, T, self.n_heads, self.head_dim).transpose(0, 2, 1, 3) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs)
        if self.training and self.p > 0:
            y = causal_attention_with_dropout(q, k, v, self.p)
        else:
            # "causal" is aligned lower-right: with a cached prefix, query i sees keys 0 .. past + i,
            # and a single new token sees every cached position, so one mask covers all three torch cases.
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask="causal")
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.dropout(self.out_proj(y))


class FeedForward(nn.Module):
    """Position-wise MLP: d_model -> d_ff -> d_model with GELU."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.fc2 = Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        # nn.gelu is the exact erf form; nn.gelu_approx is GPT-2's tanh form (torch approximate="tanh")
        self.act = nn.gelu_approx if cfg.activation == "gelu_tanh" else nn.gelu
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, x: mx.array) -> mx.array:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class NanoGPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_ln = cfg.norm_position == "pre"
        self.ln1 = LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)
        self.attn = NanoGPTAttention(cfg)
        self.ln2 = LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)
        self.ff = FeedForward(cfg)

    def __call__(self, x: mx.array, cache: KVCache | None = None, layer: int = 0) -> mx.array:
        if self.pre_ln:
            x = x + self.attn(self.ln1(x), cache, layer)
            return x + self.ff(self.ln2(x))
        x = self.ln1(x + self.attn(x, cache, layer))
        return self.ln2(x + self.ff(x))


class NanoGPTModel(nn.Module):
    """Embeddings, the blocks and the final LayerNorm: token ids (B, T) -> hidden states (B, T, d_model)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.d_model)
        self.blocks = [NanoGPTBlock(cfg) for _ in range(cfg.n_layers)]
        self.ln_f = LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)  # kept in Post-LN too, as in torch
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, idx: mx.array, cache: KVCache | None = None) -> mx.array:
        T = idx.shape[1]
        start = cache.pos if cache is not None else 0
        if start + T > self.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the context ({self.context_length})"
            )
        pos = mx.arange(start, start + T)
        x = self.token_embedding(idx) + self.position_embedding(pos)  # (B, T, C)
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)


class NanoGPTLMHeadModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = NanoGPTModel(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init, as in torch: N(0, 0.02) for Linear and Embedding weights, zero biases, LayerNorm 1/0,
        and the residual projections at 0.02 / sqrt(2 * n_layers) (two residual additions per block)."""
        std_resid = 0.02 / math.sqrt(2 * self.config.n_layers)
        for _, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight = 0.02 * mx.random.normal(m.weight.shape)
                if "bias" in m:
                    m.bias = mx.zeros_like(m.bias)
        for block in self.transformer.blocks:
            block.attn.out_proj.weight = std_resid * mx.random.normal(block.attn.out_proj.weight.shape)
            block.ff.fc2.weight = std_resid * mx.random.normal(block.ff.fc2.weight.shape)

    def __call__(self, idx: mx.array, cache: KVCache | None = None) -> mx.array:
        """idx (B, T) integer -> logits (B, T, vocab_size). With `cache`, idx holds only the new tokens."""
        h = self.transformer(idx, cache)
        if self.config.tie_embeddings:
            return self.transformer.token_embedding.as_linear(h)  # h @ W_emb^T
        return self.lm_head(h)

    def num_params(self, unique: bool = True) -> int:
        """Parameter count. unique=False counts a tied matrix twice, as the card's 52,990,464 does."""
        n = sum(p.size for _, p in tree_flatten(self.parameters()))  # the tied matrix is in the tree once
        if not unique and self.config.tie_embeddings:
            n += self.transformer.token_embedding.weight.size
        return n
