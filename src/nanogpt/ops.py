"""Operations the model runs faster than their stock PyTorch form: the lm_head loss, dropout, attention
with dropout.

`linear_cross_entropy(h, W, y)` is `F.cross_entropy(h @ W.T, y)` without ever holding the (N, vocab) logits:
it walks the positions in chunks, and when a gradient is wanted it computes the gradients of h and W during
the forward pass, chunk by chunk, in one reused buffer. At the card's size (2,048 positions x 50,257) the
stock form allocates logits, their log-softmax and the logits' gradient, 3 x 412 MB of fresh memory per
step, and spends longer on that memory (page faults, three full passes) than on the head's matmuls; the
fused form needs one 100 MB buffer. It also computes the logits transposed, W @ h.T -> (vocab, chunk),
because on x86 BLAS that layout runs at the matmul peak while h @ W.T ran at ~75% of it (measured in
docs/benchmarks.md).

`dropout(x, p, training)` is `F.dropout` with a cheaper random mask on CPU: 16 random bits per element
(four per 64-bit draw) against a threshold instead of one float draw per element, so an element is
dropped with probability round(p * 65536) / 65536 (0.10000610 for p = 0.1). `causal_attention` is the
attention of a training step with dropout on CPU, using that mask.

    loss = linear_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, targets.flatten())
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BUFFER_ELEMENTS = 1 << 25  # logits per chunk: 32M fp32 = 128 MiB at most (the card's vocab: 512 positions)


def chunk_size(n_rows: int, vocab: int) -> int:
    """Positions per chunk: a power of two with chunk x vocab <= BUFFER_ELEMENTS, at least 64, at most n_rows."""
    c = 64
    while 2 * c * vocab <= BUFFER_ELEMENTS:
        c *= 2
    return max(1, min(n_rows, c))


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


def _head_chunks(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad_scale: float | None
):
    """Yield (row slice, per-row NLL (m,), softmax-minus-one-hot (vocab, m) scaled by grad_scale or None).

    h (N, d) and w (vocab, d) in the matmul dtype. Rows whose target is ignore_index get NLL 0 and a zero
    gradient column. The yielded gradient lives in the shared buffer: use it before the next chunk.
    """
    n, vocab = h.size(0), w.size(0)
    c = chunk_size(n, vocab)
    buf = torch.empty(vocab * c, dtype=torch.float32, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        for r in range(0, n, c):
            hc, yc = h[r : r + c], targets[r : r + c]
            m = len(yc)
            logits = buf[: vocab * m].view(vocab, m)  # transposed: (vocab, m), contiguous
            if w.dtype == torch.float32:
                torch.mm(w, hc.t(), out=logits)
            else:
                logits.copy_(torch.mm(w, hc.t()))  # fp32 softmax whatever the matmul dtype
            valid = yc != ignore_index
            cols, rows = torch.arange(m, device=h.device), yc.clamp(min=0)
            target = logits[rows, cols]
            top = logits.amax(0)
            logits.sub_(top).exp_()  # in place: the buffer now holds exp(logit - max)
            total = logits.sum(0)
            nll = torch.where(valid, top + total.log() - target, 0.0)
            if grad_scale is None:
                yield slice(r, r + m), nll, None
                continue
            keep = valid.to(torch.float32) * grad_scale
            logits.mul_(keep / total)  # softmax x scale, zero for ignored rows
            logits[rows, cols] -= keep
            yield slice(r, r + m), nll, logits


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in the forward pass; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, mean):  # type: ignore[override]
        count = int((targets != ignore_index).sum())
        scale = 1.0 / count if mean and count else 1.0
        cdt = _compute_dtype(h)
        grad_h = torch.empty(h.shape, dtype=cdt, device=h.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        w, hc_all = weight.to(cdt), h.to(cdt)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for rows, nll, g in _head_chunks(hc_all, w, targets, ignore_index, scale):
                loss += nll.sum()
                g = g.to(cdt)
                torch.mm(g.t(), w, out=grad_h[rows])  # (m, vocab) @ (vocab, d)
                if cdt == torch.float32:
                    grad_w.addmm_(g, hc_all[rows])  # (vocab, m) @ (m, d)
                else:
                    grad_w += torch.mm(g, hc_all[rows]).float()
        ctx.grads = grad_h.to(h.dtype), grad_w.to(weight.dtype)
        return loss * scale if mean else loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.grads
        del ctx.grads
        return grad_h.mul_(grad_out), grad_w.mul_(grad_out), None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """`F.cross_entropy(h @ weight.T, targets, reduction=...)` in fp32, never materialising the logits.

    h (N, d), weight (vocab, d), targets (N,) int64; reduction "mean" (over targets != ignore_index) or
    "sum". Under autocast the matmuls run in the autocast dtype and the softmax in fp32.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, reduction == "mean")
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    cdt = _compute_dtype(h)
    for _, nll, _ in _head_chunks(h.to(cdt), weight.to(cdt), targets, ignore_index, None):
        total += nll.sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum()


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A bool mask shaped like x, False with probability round(p * 65536) / 65536."""
    n = x.numel()
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    return bits.view(torch.int16)[:n].view(x.shape) >= round(p * 65536) - 32768  # int16: uniform on [-2^15, 2^15)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(x, p, training); on CPU with a 16-bit-threshold mask (see the module docstring)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not x.is_floating_point():
        return F.dropout(x, p, True)
    return torch.where(keep_mask(x, p), x, 0.0).mul_(1.0 / (1.0 - p))  # autograd keeps the bool mask


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(hs)) v with dropout p on the weights: (B, nh, T, hs) each -> (B, nh, T, hs).

    What SDPA's math path computes, written out so the dropout uses `keep_mask`: on CPU, SDPA has no fused
    kernel with dropout and its own mask draw took longer than the attention matmuls. The 1 / (1 - p)
    rescaling is applied to the (T, hs) output rather than to the (T, T) weights.
    """
    B, nh, T, hs = q.shape
    q, k, v = (t.reshape(B * nh, T, hs) for t in (q, k, v))
    future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    att = torch.softmax(torch.baddbmm(future, q, k.transpose(1, 2), alpha=hs**-0.5), dim=-1)
    att = torch.where(keep_mask(att, p), att, 0.0)
    return torch.bmm(att, v).mul_(1.0 / (1.0 - p)).view(B, nh, T, hs)
