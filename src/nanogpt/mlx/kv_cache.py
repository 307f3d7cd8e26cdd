"""A preallocated key/value cache for incremental decoding in MLX, mirroring `nanogpt.model.kv_cache`.

Each layer owns one key and one value array sized for the whole context up front; `update` writes the
new positions in place (MLX slice assignment) and returns the filled prefix, and the model calls
`advance` once per forward pass, exactly as the PyTorch cache does.

    cache = KVCache.for_model(cfg, batch_size=1)
    logits = model(prompt, cache=cache)          # prefill
    logits = model(next_token, cache=cache)      # one step
"""

from __future__ import annotations

import mlx.core as mx

from nanogpt.config import ModelConfig


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        dtype: mx.Dtype = mx.float32,
    ) -> None:
        shape = (batch_size, n_heads, max_len, head_dim)  # per layer: (B, nh, T_max, hs)
        self.k = [mx.zeros(shape, dtype=dtype) for _ in range(n_layers)]
        self.v = [mx.zeros(shape, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.pos = 0  # number of positions already stored

    @classmethod
    def for_model(
        cls, cfg: ModelConfig, batch_size: int, dtype: mx.Dtype = mx.float32, max_len: int | None = None
    ) -> KVCache:
        return cls(cfg.n_layers, batch_size, cfg.n_heads, max_len or cfg.context_length, cfg.head_dim, dtype)

    def update(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store k, v (B, nh, T, hs) at the current position; return all keys/values so far (B, nh, pos+T, hs)."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0
