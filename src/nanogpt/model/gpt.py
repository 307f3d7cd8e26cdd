"""The GPT network of the model card, in PyTorch: nothing but the network.

Module names and shapes are exactly those the card prints (`transformer.token_embedding`,
`transformer.blocks.N.attn.qkv_proj`, ...), so `print(NanoGPTLMHeadModel(preset("card")))` reproduces
the card's tree. Reading order: LayerNorm/Linear -> attention -> feed-forward -> block -> model.

Pre-LN (the default) is the GPT-2 block: x = x + f(ln(x)), with a final LayerNorm. The card calls
Post-LN "standard GPT-2", which is wrong: GPT-2 is Pre-LN, and that is why this model can be exported
as a native GPT-2 checkpoint. Post-LN, x = ln(x + f(x)) (the original Transformer, BERT), is
available through `norm_position="post"` for comparisons.

It uses three operations of `nanogpt.kernels`, each the stock PyTorch op made faster where it can be:
`causal_attention` (SDPA), `dropout` (F.dropout) and `linear_cross_entropy` (the loss of the head without
its logits). The decode fast path needs nothing from this file: it plugs in from outside
(`kernels.decode.Decoder`, which calls `model(x, cache, last_only=True)`). A cache is anything that
satisfies `model.kv_cache.Cache`.

    model = NanoGPTLMHeadModel(preset("card"))
    logits = model(idx)  # idx (B, T) int64 -> logits (B, T, vocab_size)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from nanogpt.config import ModelConfig
from nanogpt.kernels import causal_attention, dropout, linear_cross_entropy
from nanogpt.model.kv_cache import Cache


class Linear(nn.Linear):
    """nn.Linear that prints as the card does: `Linear(384, 1152)`."""

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}"


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that prints as the card does: `LayerNorm((384,), eps=1e-05)`."""

    def extra_repr(self) -> str:
        return f"{tuple(self.normalized_shape)}, eps={self.eps}"


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(hs)) v written out, returning the weights too: (y (B, nh, T, hs), w (B, nh, T, keys)).

    The attention the model computes, for looking at (the playground's heatmaps), never for speed: SDPA does
    not return its weights. q (B, nh, T, hs); k, v (B, nh, past + T, hs). Query i sees keys 0 .. past + i,
    or, with `mask` (B, 1, T, keys) bool, the keys it marks. The scores and the softmax are fp32 whatever
    the precision around (autocast off here), so each row of w sums to 1 to fp32 rounding; y is then
    multiplied in v's dtype, as the fast path's output is.
    """
    T, keys = q.size(2), k.size(2)
    if mask is None:  # the causal rule after `past` cached positions
        mask = torch.ones(T, keys, dtype=torch.bool, device=q.device).tril(diagonal=keys - T)
    with torch.autocast(q.device.type, enabled=False):
        scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, keys)
        w = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return w.to(v.dtype) @ v, w


class NanoGPTAttention(nn.Module):
    """Causal multi-head self-attention with one fused QKV projection.

    `weights`, a list, asks for the eager path: this layer's attention weights (B, nh, T, keys) are
    appended to it (`eager_attention`). Without it the fast path (`kernels.causal_attention`) runs.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        self.qkv_proj = Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.out_proj = Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(
        self,
        x: torch.Tensor,
        cache: Cache | None = None,
        layer: int = 0,
        weights: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv_proj(x).split(C, dim=2)  # (B, T, 3C) -> three (B, T, C)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        mask = None
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs): the cached positions, then these
            mask = cache.mask  # None, or which keys each query sees when rows differ (a batch of streams)
        # query i sees keys 0 .. past + i; softmax(q k^T / sqrt(hs)) v, with dropout on the weights
        if weights is None:
            y = causal_attention(q, k, v, self.dropout if self.training else 0.0, mask=mask)  # (B, nh, T, hs)
        else:  # the weights asked for: written out, no dropout (inference only)
            y, w = eager_attention(q, k, v, mask)
            weights.append(w)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return dropout(self.out_proj(y), self.dropout, self.training)


class FeedForward(nn.Module):
    """Position-wise MLP: d_model -> d_ff -> d_model with GELU."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.fc2 = Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x), approximate=self.approximate)  # (B, T, d_ff)
        return dropout(self.fc2(h), self.dropout, self.training)  # (B, T, C)


class NanoGPTBlock(nn.Module):
    """Attention then MLP, each residual: Pre-LN x + f(ln(x)), or Post-LN ln(x + f(x)). (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_ln = cfg.norm_position == "pre"
        self.ln1 = LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)
        self.attn = NanoGPTAttention(cfg)
        self.ln2 = LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)
        self.ff = FeedForward(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cache: Cache | None = None,
        layer: int = 0,
        weights: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # typed locals: an nn.Module's call returns Any to the type checker
        if self.pre_ln:
            x = x + self.attn(self.ln1(x), cache, layer, weights)
            y: torch.Tensor = self.ff(self.ln2(x))
            return x + y
        x = self.ln1(x + self.attn(x, cache, layer, weights))
        out: torch.Tensor = self.ln2(x + self.ff(x))
        return out


class NanoGPTModel(nn.Module):
    """Embeddings, the blocks and the final LayerNorm: token ids (B, T) -> hidden states (B, T, d_model)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dropout = cfg.dropout
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.d_model)
        self.blocks = nn.ModuleList(NanoGPTBlock(cfg) for _ in range(cfg.n_layers))
        # Kept in Post-LN mode too (there it re-normalises the last block's output) so that both
        # variants share one parameter layout and one checkpoint format.
        self.ln_f = LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)

    def forward(
        self, idx: torch.Tensor, cache: Cache | None = None, attention: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        T = idx.size(1)
        if cache is not None:  # it knows where new tokens go: (T,) positions, or (B, T) when rows differ
            pos = cache.positions(T, idx.device)
        elif self.position_embedding.num_embeddings < T:
            raise ValueError(
                f"sequence of {T} tokens is longer than the context ({self.position_embedding.num_embeddings})"
            )
        else:
            pos = torch.arange(T, device=idx.device)
        x = self.token_embedding(idx) + self.position_embedding(pos)  # (B, T, C)
        x = dropout(x, self.dropout, self.training)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, attention)  # each layer appends its weights to `attention`, if given
        if cache is not None:
            cache.advance(T)
        h: torch.Tensor = self.ln_f(x)
        return h


class NanoGPTLMHeadModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = NanoGPTModel(cfg)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.token_embedding.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers) so the residual stream's
        # variance does not grow with depth (two residual additions per block).
        for name, p in self.named_parameters():
            if name.endswith(("attn.out_proj.weight", "ff.fc2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        cache: Cache | None = None,
        targets: torch.Tensor | None = None,
        last_only: bool = False,
        hidden: bool = False,
        attention: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """idx (B, T) int64 -> logits (B, T, vocab_size). With `cache`, idx holds only the new tokens.

        `last_only` gives the logits of the last position only, (B, 1, vocab_size): what sampling needs,
        and half a long prompt's cost (the (T, d) x (d, 50257) head is as big as the blocks). With
        `targets` (B, T) it returns the mean next-token cross-entropy instead (fp32, positions with
        target -100 ignored), computed by `linear_cross_entropy` without the (B, T, vocab) logits.
        `hidden` returns the final hidden states (B, T, d_model) before the head, for a loss that applies
        the head itself a chunk at a time (distillation, `nanogpt.distill.chunked`). `attention`, a list,
        runs the eager attention path and receives each layer's weights (B, nh, T, keys), first layer first:
        what the playground draws (`serve`'s attention job); the output equals the fast path's to rounding.
        """
        h: torch.Tensor = self.transformer(idx, cache, attention)  # (B, T, d_model)
        if hidden:
            return h
        if targets is not None:
            return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())
        if last_only:  # (B, d_model) rows: a (B, 1, d_model) view of a long h would go to a batched matmul
            last: torch.Tensor = self.lm_head(h[:, -1])  # (B, vocab_size)
            return last[:, None]  # (B, 1, vocab_size)
        logits: torch.Tensor = self.lm_head(h)  # (B, T, vocab_size)
        return logits

    if TYPE_CHECKING:  # nn.Module calls are (...) -> Any to a type checker: model(...) is checked as forward
        __call__ = forward

    def num_params(self, unique: bool = True) -> int:
        """Parameter count. unique=False counts a tied matrix twice, as the card's 52,990,464 does."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if not unique and self.config.tie_embeddings:
            n += self.lm_head.weight.numel()
        return n
