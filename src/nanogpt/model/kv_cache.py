"""A preallocated key/value cache for incremental decoding.

Keys and values for every layer live in two tensors sized for the whole context up front, so decoding
never reallocates or concatenates. Each attention layer writes its new positions with `update`, and the
model (`NanoGPTModel.forward`) calls `advance` once per forward pass, after the last layer; the generator
(`nanogpt.infer.generate`) only creates the cache and `reset`s it when the window slides.

    cache = KVCache.for_model(cfg, batch_size=1, device="cpu", dtype=torch.float32)
    logits = model(prompt, cache=cache)          # prefill
    logits = model(next_token, cache=cache)      # one step
"""

from __future__ import annotations

import torch

from nanogpt.config import ModelConfig


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (n_layers, batch_size, n_heads, max_len, head_dim)  # (L, B, nh, T_max, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # number of positions already stored

    @classmethod
    def for_model(
        cls,
        cfg: ModelConfig,
        batch_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_len: int | None = None,
    ) -> KVCache:
        return cls(
            cfg.n_layers, batch_size, cfg.n_heads, max_len or cfg.context_length, cfg.head_dim, device, dtype
        )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at the current position; return all keys/values so far (B, nh, pos+T, hs)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0
