"""Sliding-window perplexity of an MLX model: `nanogpt.infer.evaluate`'s windows, scored by MLX.

The windows, the bookkeeping and the result are the PyTorch side's (`score_windows`, and
`evaluate_documents` per document), so both backends score exactly the same targets; only the forward
pass differs (fp32, MLX's own log-softmax).

    result = sliding_window_nll(load_model("runs/demo"), split_tokens("data/builtin"), stride=256)
"""

from __future__ import annotations

import mlx.core as mx
import torch

from nanogpt.infer.evaluate import EvalResult, check_tokens, evaluate_documents, score_windows
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

    def score_rows(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> list[float]:
        nll = token_nll(model, mx.array(x.numpy()), mx.array(y.numpy()))  # (B, L) fp32
        # the stub types tolist() as every nesting at once; a 1-D array gives a list of floats
        rows: list[float] = (nll * mx.array(mask.numpy())).sum(axis=1).tolist()  # type: ignore[assignment]
        return rows

    window = dict(context=context, stride=stride, batch_size=batch_size)
    if per_document:
        return evaluate_documents(tokens, score_rows, **window, progress=progress)
    return score_windows(tokens, lambda x, y, m: float(sum(score_rows(x, y, m))), **window, progress=progress)
