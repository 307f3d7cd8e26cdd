"""Sliding-window perplexity of an MLX model: `nanogpt.infer.evaluate`'s windows, scored by MLX.

The windows, the bookkeeping and the result are the PyTorch side's (`score_windows`, and
`evaluate_documents` per document), so both backends score exactly the same targets; only the forward
pass differs (fp32, MLX's own log-softmax).

    result = sliding_window_nll(load_model("runs/demo"), split_tokens("data/builtin"), stride=256)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np
import torch

from nanogpt.infer.evaluate import (
    EvalResult,
    check_conversations,
    check_tokens,
    evaluate_documents,
    score_conversations,
    score_windows,
)
from nanogpt.mlx.model import NanoGPTLMHeadModel
from nanogpt.mlx.train.optim import token_nll


def sliding_window_nll(
    model: NanoGPTLMHeadModel,
    tokens: torch.Tensor,
    *,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    per_document: bool = False,
) -> EvalResult:
    """`nanogpt.infer.evaluate.sliding_window_nll` for an MLX model, fp32."""
    cfg = model.config
    context = cfg.context_length if context is None else context
    stride = context if stride is None else stride
    tokens = check_tokens(tokens, cfg, context, stride, batch_size)

    score_rows = _row_scorer(model)
    window = dict(context=context, stride=stride, batch_size=batch_size)
    if per_document:
        return evaluate_documents(tokens, score_rows, **window, progress=progress)
    return score_windows(tokens, lambda x, y, m: float(sum(score_rows(x, y, m))), **window, progress=progress)


def conversation_nll(
    model: NanoGPTLMHeadModel,
    convs: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> EvalResult:
    """`nanogpt.infer.evaluate.conversation_nll` for an MLX model, fp32."""
    cfg = model.config
    check_conversations(convs, cfg, batch_size)
    score_rows = _row_scorer(model)
    return score_conversations(
        convs,
        lambda x, y, m: float(sum(score_rows(x, y, m))),
        context=cfg.context_length,
        batch_size=batch_size,
        progress=progress,
    )


def _row_scorer(
    model: NanoGPTLMHeadModel,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[float]]:
    """The summed NLL of each row's masked targets (rows of (B, L) CPU tensors), fp32."""

    def score_rows(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> list[float]:
        nll = token_nll(model, mx.array(x.numpy()), mx.array(y.numpy()))  # (B, L) fp32
        # the stub types tolist() as every nesting at once; a 1-D array gives a list of floats
        rows: list[float] = (nll * mx.array(mask.numpy())).sum(axis=1).tolist()  # type: ignore[assignment]
        return rows

    return score_rows
