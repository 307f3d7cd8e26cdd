"""The compiled decode step: `Decoder(model, dtype, compile=True)` runs each one-token step through
`torch.compile` (inductor; C++ code generation on CPU), which fuses the step's elementwise work (LayerNorm,
GELU, the residual adds, the attention's softmax) and drops PyTorch's per-operation dispatch.

A graph is compiled for fixed shapes, so the step reads the cache through a view of fixed shapes: the cache's
`static_step()` (for `model.kv_cache.KVCache`, a `StaticStep`) holds the new token's position in a tensor and
hands the attention every position, masking the unfilled ones. One graph then serves every position of a
stream, and every stream of the same batch size and context. The price: the attention reads all of the
cache at every step. The first step pays for the compilation (seconds to a minute, docs/benchmarks.md);
prefills stay eager, and the eager `Decoder` stays the reference. The layers multiply by the same decode
copies as the eager step (`decode._traced_step`, the function the decoder hands this class, says so).

    step = CompiledStep(lambda tokens, view: model(tokens, view, last_only=True))
    logits = step(next_ids, cache)  # cache: a `StaticCache`, e.g. a KVCache; (B, 1) -> (B, 1, V)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

_View = TypeVar("_View", covariant=True)


@runtime_checkable
class StaticCache(Protocol[_View]):
    """A cache that a compiled step can use: a view of fixed shapes for the next one-token step, and
    `advance`, called by the step after the model (the view itself must not count positions)."""

    def static_step(self) -> _View: ...

    def advance(self, T: int) -> None: ...


class CompiledStep:
    """`step(tokens, view)`, one model's one-token call on a static view, compiled (see the module docstring).

    Call it under the decoder's modes (inference, autocast). `fullgraph=True`: a graph break would put eager
    dispatch back into the step, so it is an error here, not a silent slowdown. `dynamic=False`: every shape is the cache's, fixed, so no symbolic shapes are needed.
    """

    def __init__(self, step: Callable[[torch.Tensor, Any], torch.Tensor]) -> None:
        self.step = step
        self._fn: Any = torch.compile(step, dynamic=False, fullgraph=True)

    def __call__(self, tokens: torch.Tensor, cache: StaticCache[Any]) -> torch.Tensor:
        """Next-token logits (B, 1, V) of `tokens` (B, 1) after what `cache` holds; the cache advances."""
        logits: torch.Tensor = self._fn(tokens, cache.static_step())
        cache.advance(tokens.size(1))
        return logits
