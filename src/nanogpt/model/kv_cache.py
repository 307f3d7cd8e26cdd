"""Key/value caches for incremental decoding, and `Cache`: the one interface the model calls on them.

`Cache` (a `typing.Protocol`, as mlx-lm's `_BaseCache`) is everything `model/gpt.py` asks of a cache: where
the new tokens go (`positions`), which keys each query sees (`mask`), store-and-read (`update`), and
`advance` once per forward. `KVCache` (one stream) and `SlotKVCache.rows(...)` (a view of a serving
batch's slots, `SlotStep`) both satisfy it, and the type checker proves it where they are passed in.

Keys and values for every layer live in two tensors sized for the whole context up front, so decoding
never reallocates or concatenates. Each attention layer writes its new positions with `update`, and the
model (`NanoGPTModel.forward`) calls `advance` once per forward pass, after the last layer; the generator
(`nanogpt.infer.generate`) only creates the cache and `reset`s it when the window slides.

    cache = KVCache.for_model(cfg, batch_size=1, device="cpu", dtype=torch.float32)
    logits = model(prompt, cache=cache)          # prefill
    logits = model(next_token, cache=cache)      # one step
"""

from __future__ import annotations

from typing import Protocol

import torch

from nanogpt.config import ModelConfig


class Cache(Protocol):
    """What the model calls on a KV cache during one forward (`NanoGPTModel.forward` and the attention).

    A forward of T new tokens per row calls `positions(T, device)` first, then `update(layer, k, v)` in
    every attention layer, reading `mask` there, and `advance(T)` once after the last layer.
    """

    @property
    def mask(self) -> torch.Tensor | None:
        """(B, 1, T, keys) bool: which keys each query sees when rows differ; None: the causal rule is enough."""
        ...

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        """Positions of the T new tokens: (T,) when every row holds as many, else (B, T)."""
        ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new k, v (B, nh, T, hs) of `layer`; return its keys/values the queries attend to."""
        ...

    def advance(self, T: int) -> None:
        """The forward is done: the T new positions now count as stored."""
        ...


class KVCache:
    """The preallocated cache of one stream (every row holds the same positions); a `Cache`."""

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
        self._static: StaticStep | None = None  # the view of `static_step`, made at its first call

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

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        """Positions (T,) of T new tokens: right after what the cache holds."""
        if self.pos + T > self.max_len:
            raise ValueError(f"sequence of {self.pos + T} tokens is longer than the context ({self.max_len})")
        return torch.arange(self.pos, self.pos + T, device=device)

    mask: torch.Tensor | None = None  # every row holds the same positions: the causal rule is enough

    def advance(self, T: int) -> None:
        self.pos += T

    def reset(self) -> None:
        self.pos = 0

    def static_step(self) -> StaticStep:
        """This cache as the next one-token step sees it at fixed shapes (`StaticStep`), for a compiled step.

        The caller runs the model on the view, then calls `advance(1)` on this cache (the view never
        touches `pos`: a compiled graph that read a Python int would be rebuilt at every position).
        """
        if self.pos >= self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.pos + 1} requested")
        view = self._static
        if view is None:  # one view per cache, its tensors made once: a compiled graph's inputs
            view = self._static = StaticStep(self)
        view.pos.fill_(self.pos)
        return view


class StaticStep:
    """A one-token step's view of a `KVCache` whose shapes never change with the position; a `Cache`.

    `KVCache` hands the attention its keys up to the position stored, a new shape at every token, so a
    compiled step would be rebuilt at each one. This view writes the new keys/values at a position held in a
    tensor and hands the attention all `max_len` of them, with a mask over the unfilled ones: one graph
    serves every position (at the cost of reading the whole cache each step). `advance` does nothing: the
    caller advances the owning `KVCache` after the call (`KVCache.static_step`).
    """

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.pos = torch.zeros(1, dtype=torch.long, device=cache.k.device)  # (1,): the new token's position
        self.key_pos = torch.arange(cache.max_len, device=cache.k.device)  # (max_len,)
        self.layers = torch.arange(cache.k.size(0), device=cache.k.device)[:, None]  # (L, 1)

    @property
    def mask(self) -> torch.Tensor:
        """(1, 1, 1, max_len) bool: the new token sees the stored positions and itself."""
        return (self.key_pos <= self.pos)[None, None, None]

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        return self.pos  # (1,)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, 1, hs) at `pos`; return every position's keys/values (B, nh, max_len, hs)."""
        at = [self.layers[layer], None, None, self.pos]  # (layer, every row, every head, pos)
        torch.ops.aten.index_put_(self.cache.k, at, k[:, :, 0][None])  # (1, B, nh, hs) into (L, B, nh, T, hs)
        torch.ops.aten.index_put_(self.cache.v, at, v[:, :, 0][None])
        return self.cache.k[layer], self.cache.v[layer]

    def advance(self, T: int) -> None:
        """Nothing: the owning cache advances outside the compiled graph (see the class docstring)."""


class SlotKVCache:
    """Keys/values of up to `slots` independent sequences (a server's batch), each with its own length.

    One model call feeds rows `start .. start + B` of the slots (`rows`): row b brings `n_new[b]` tokens,
    left-padded to the longest, so every row's last token sits in the last column (`last_only` logits are
    each row's next-token logits). The view that `rows` returns gives the model each row's positions and a
    mask of the keys each query sees; padding writes to a scratch position past the context, so it never
    lands on a real key. The server keeps its active sequences in consecutive slots (`move`, `swap`), so a
    call reads a slice of the cache and never gathers it.

    cache = SlotKVCache.for_model(cfg, slots=32)
    logits = model(idx, cache=cache.rows(0, [12, 5]), last_only=True)  # (2, 1, V): two prompts at once
    logits = model(next_ids, cache=cache.rows(0, [1, 1]), last_only=True)  # one decode step of both
    """

    def __init__(
        self,
        n_layers: int,
        slots: int,
        n_heads: int,
        context_length: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (n_layers, slots, n_heads, context_length + 1, head_dim)  # +1: the scratch position
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.context_length = context_length
        self.lengths = [0] * slots  # positions stored per slot

    @classmethod
    def for_model(
        cls,
        cfg: ModelConfig,
        slots: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> SlotKVCache:
        return cls(cfg.n_layers, slots, cfg.n_heads, cfg.context_length, cfg.head_dim, device, dtype)

    def rows(self, start: int, n_new: list[int]) -> SlotStep:
        """The cache as one model call of slots start .. start + len(n_new) sees it (see the class docstring)."""
        return SlotStep(self, start, n_new)

    def move(self, src: int, dst: int) -> None:
        """Slot `dst` takes slot `src`'s keys and values (`src` is left as it was)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def swap(self, a: int, b: int) -> None:
        if a == b:
            return
        n = self.lengths[a]
        k, v = self.k[:, a, :, :n].clone(), self.v[:, a, :, :n].clone()
        self.move(b, a)
        self.k[:, b, :, :n], self.v[:, b, :, :n] = k, v
        self.lengths[b] = n


class SlotStep:
    """One model call's view of a `SlotKVCache`: a `Cache` (positions, mask, update, advance)."""

    def __init__(self, cache: SlotKVCache, start: int, n_new: list[int]) -> None:
        if not n_new or min(n_new) < 1:
            raise ValueError("every row of a step feeds at least one token")
        self.cache, self.start, self.n_new = cache, start, n_new
        device = cache.k.device
        B, T = len(n_new), max(n_new)
        lengths = torch.tensor(cache.lengths[start : start + B], device=device)  # (B,)
        n = torch.tensor(n_new, device=device)
        if int((lengths + n).max()) > cache.context_length:
            raise ValueError(f"a row would hold more than the context ({cache.context_length}) tokens")
        rel = torch.arange(T, device=device)[None] - (T - n)[:, None]  # (B, T): index among the new tokens
        self.pos = lengths[:, None] + rel.clamp(min=0)  # padding takes the row's first new position
        self.write_pos = torch.where(rel >= 0, self.pos, cache.context_length)  # padding: the scratch slot
        self.keys = int((lengths + n).max())
        # query (b, i) sees key j when j <= its position: its own past, then the new tokens up to itself
        j = torch.arange(self.keys, device=device)
        self.mask = (j[None, None, :] <= self.pos[:, :, None])[:, None]  # (B, 1, T, keys)

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        return self.pos  # (B, T)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at each row's positions; return the rows' keys/values (B, nh, keys, hs)."""
        B = k.size(0)
        rows = torch.arange(self.start, self.start + B, device=k.device)[:, None].expand_as(self.write_pos)
        self.cache.k[layer][rows, :, self.write_pos] = k.transpose(1, 2)  # (B, T, nh, hs) at (row, pos)
        self.cache.v[layer][rows, :, self.write_pos] = v.transpose(1, 2)
        end = self.start + B
        return self.cache.k[layer, self.start : end, :, : self.keys], self.cache.v[
            layer, self.start : end, :, : self.keys
        ]

    def advance(self, T: int) -> None:
        for b, n in enumerate(self.n_new):
            self.cache.lengths[self.start + b] += n
