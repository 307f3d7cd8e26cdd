"""Dense distillation in bounded memory: the loss from the final hidden states, a chunk of positions at a time.

`distill_parts` on logits needs the student's and the teacher's (B, T, V) logits at once, and its divergence
keeps several more tensors of that size alive for the backward pass: at the card's batch (12 x 512 x 50,257,
fp32) that is 1.24 GB per tensor. `chunked_distill_parts` takes the hidden states and the two heads instead
and walks the positions in chunks, as the fused training head (`nanogpt.kernels.ops.linear_cross_entropy`)
does: each chunk's student and teacher logits live only while that chunk is scored, and when a gradient is
wanted the chunk's gradients of the hidden states and the head are taken right there, so nothing of
(B, T, V) size is ever kept for the backward pass. Values and gradients equal `distill_parts` on the full
logits (tests: every divergence, T != 1, ignored positions).

    parts = chunked_distill_parts((h, model.lm_head.weight), (t_h, t_head), y, Mix(alpha=0.5, T=2.0))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nanogpt.distill.losses import LossParts, divergence

CHUNK_ELEMENTS = 1 << 21  # logits per chunk: 2M fp32 = 8 MiB each (the card's vocab: 41 positions); about
# twenty such tensors live while a chunk is scored and differentiated
IGNORE = -100  # a target that is not scored (padding), as F.cross_entropy's default


def chunk_rows(n_rows: int, vocab: int) -> int:
    """Positions per chunk: as many as keep chunk x vocab within CHUNK_ELEMENTS, at least 1."""
    return max(1, min(n_rows, CHUNK_ELEMENTS // vocab))


def _chunk_sums(
    h: torch.Tensor,
    weight: torch.Tensor,
    t_logits: torch.Tensor,
    y: torch.Tensor,
    T: float,
    div: str,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed hard CE and summed divergence (without T^2) over one chunk's scored positions."""
    s = h.float() @ weight.float().t()  # (m, V) student logits
    valid = y != IGNORE
    hard = F.cross_entropy(s, y, ignore_index=IGNORE, reduction="sum")
    logq = F.log_softmax(s / T, dim=-1)
    logp = F.log_softmax(t_logits / T, dim=-1)
    soft = torch.where(valid, divergence(logp, logq, div, beta), 0.0).sum()
    return hard, soft


class _ChunkedDistill(torch.autograd.Function):
    """total = alpha * hard + (1 - alpha) * T^2 * soft (means over scored positions), its gradients for h and
    the student head taken chunk by chunk in the forward pass and scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(
        ctx: Any,
        h: torch.Tensor,
        weight: torch.Tensor,
        t_h: torch.Tensor,
        t_weight: torch.Tensor,
        y: torch.Tensor,
        settings: tuple[float, float, str, float],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        alpha, T, div, beta = settings
        n, vocab = h.size(0), weight.size(0)
        scored = max(1, int((y != IGNORE).sum()))
        want = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        hard_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        soft_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.zeros_like(h) if want else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want else None
        w = weight.detach()
        c = chunk_rows(n, vocab)
        for r in range(0, n, c):
            rows = slice(r, min(n, r + c))
            t_logits = t_h[rows].float() @ t_weight.float().t()  # (m, V), teacher: no grad
            if not want:
                hard, soft = _chunk_sums(h[rows], w, t_logits, y[rows], T, div, beta)
            else:
                hc, wc = h[rows].detach().requires_grad_(), w.requires_grad_()
                with torch.enable_grad():
                    hard, soft = _chunk_sums(hc, wc, t_logits, y[rows], T, div, beta)
                    part = (alpha * hard + (1 - alpha) * T * T * soft) / scored
                    gh, gw = torch.autograd.grad(part, (hc, wc))
                grad_h[rows] = gh  # type: ignore[index]
                grad_w += gw  # type: ignore[operator]
                w = weight.detach()  # a fresh leaf: the next chunk's graph starts clean
            hard_sum += hard.detach()
            soft_sum += soft.detach()
        ctx.save_for_backward(grad_h, grad_w)
        hard_mean, soft_mean = hard_sum / scored, T * T * soft_sum / scored
        ctx.mark_non_differentiable(hard_mean, soft_mean)
        return alpha * hard_mean + (1 - alpha) * soft_mean, hard_mean, soft_mean

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_total if grad_h is not None and ctx.needs_input_grad[0] else None
        gw = (
            (grad_w * grad_total).to(grad_w.dtype) if grad_w is not None and ctx.needs_input_grad[1] else None
        )
        return gh, gw, None, None, None, None


@dataclass(frozen=True)
class Mix:
    """How the two losses combine: alpha on the hard loss, the divergence at temperature T (beta: JSD's)."""

    alpha: float = 0.5
    T: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5


def chunked_distill_parts(
    student: tuple[torch.Tensor, torch.Tensor],
    teacher: tuple[torch.Tensor, torch.Tensor],
    targets: torch.Tensor,
    mix: Mix = Mix(),
) -> LossParts:
    """`distill_parts` from hidden states: `student` (h (..., d), head (V, d)), `teacher` (h (..., d_t), head
    (V, d_t)), targets (...) with IGNORE for unscored positions; means over the scored positions."""
    (h, weight), (t_h, t_weight) = student, teacher
    settings = (mix.alpha, mix.T, mix.divergence, mix.beta)
    total, hard, soft = _ChunkedDistill.apply(
        h.flatten(0, -2),
        weight,
        t_h.flatten(0, -2).detach(),
        t_weight.detach(),
        targets.reshape(-1),
        settings,
    )
    return LossParts(total, hard, soft)
