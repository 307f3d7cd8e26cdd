"""Operations the model runs faster than their stock PyTorch form: the lm_head loss, dropout, attention
with dropout.

`linear_cross_entropy(h, W, y)` is `F.cross_entropy(h @ W.T, y)` without ever holding the (N, vocab) logits:
it walks the positions in chunks, and when a gradient is wanted it computes the gradients of h and W during
the forward pass, chunk by chunk, in one reused buffer. At the card's size (2,048 positions x 50,257) the
stock form allocates logits, their log-softmax and the logits' gradient, 3 x 412 MB of fresh memory per
step, and spends longer on that memory (page faults, three full passes) than on the head's matmuls; the
fused form needs one 100 MB buffer. It also computes the logits transposed, W @ h.T -> (vocab, chunk),
because on x86 BLAS that layout runs at the matmul peak while h @ W.T ran at ~75% of it (measured in
docs/benchmarks.md). Without gradients on CPU (evaluation) it folds cache-sized vocabulary tiles into an
online softmax instead, one trip through memory for the logits.

`dropout(x, p, training)` is `F.dropout` with a cheaper random mask on CPU: 16 random bits per element
(four per 64-bit draw) against a threshold instead of one float draw per element, so an element is
dropped with probability round(p * 65536) / 65536 (0.10000610 for p = 0.1). `causal_attention` is the
model's attention, with or without a KV cache's prefix: SDPA, except a training step with dropout on CPU,
which goes to `blocked_causal_attention` (that mask, in query blocks that skip most of the masked upper
triangle).

    loss = linear_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, targets.flatten())
"""

from __future__ import annotations

from typing import Any, overload

import torch
import torch.nn.functional as F

BUFFER_ELEMENTS = 1 << 25  # logits per chunk on CPU: 32M fp32 = 128 MiB (the card's vocab: 512 positions)
ATTENTION_BLOCKS = 4  # query blocks of `causal_attention`
NLL_BLOCK, NLL_ROWS = 4096, 512  # no-grad CPU tiles: vocabulary rows (fp32) x positions (both paths)
CUDA_BUFFER_ELEMENTS = 1 << 27  # on CUDA the caching allocator makes a larger buffer free: fewer launches


def chunk_size(n_rows: int, vocab: int, budget: int = BUFFER_ELEMENTS) -> int:
    """Positions per chunk: a power of two with chunk x vocab <= budget, at least 64, at most n_rows."""
    c = 64
    while 2 * c * vocab <= budget:
        c *= 2
    return max(1, min(n_rows, c))


def _matmul_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: autocast's if it is on for h's device, else h's own."""
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype


@overload
def _fused_head(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@overload
def _fused_head(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, grad_scale: None
) -> tuple[torch.Tensor, None, None]: ...


def _fused_head(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    grad_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Summed NLL (fp32 scalar) and, when grad_scale is given, the gradients of h and weight x grad_scale.

    h (N, d), weight (vocab, d): the matmuls run in the autocast dtype if autocast is on (else h's
    dtype), the softmax in fp32, chunk by chunk in one reused (vocab, chunk) buffer. Rows whose target is
    ignore_index add 0 and get a zero gradient. No host sync: the loop and every shape are static.
    """
    dev = h.device
    cdt = _matmul_dtype(h)
    n, vocab = h.size(0), weight.size(0)
    budget = CUDA_BUFFER_ELEMENTS if dev.type == "cuda" else BUFFER_ELEMENTS
    c = chunk_size(n, vocab, budget)
    want_grads = grad_scale is not None
    with torch.autocast(dev.type, enabled=False):
        hc, w = h.to(cdt), weight.to(cdt)
        buf = torch.empty(vocab * c, dtype=torch.float32, device=dev)
        loss = torch.zeros((), dtype=torch.float32, device=dev)
        grad_h = torch.empty(h.shape, dtype=cdt, device=dev) if want_grads else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if want_grads else None
        for r in range(0, n, c):
            rows, yc = slice(r, min(n, r + c)), targets[r : r + c]
            m = len(yc)
            logits = buf[: vocab * m].view(vocab, m)  # transposed: (vocab, m), contiguous
            if cdt == torch.float32:
                torch.mm(w, hc[rows].t(), out=logits)
            else:
                logits.copy_(torch.mm(w, hc[rows].t()))  # fp32 softmax whatever the matmul dtype
            valid = yc != ignore_index
            cols, tgt = torch.arange(m, device=dev), yc.clamp(min=0)
            target = logits[tgt, cols]
            top = logits.amax(0)
            logits.sub_(top).exp_()  # in place: the buffer now holds exp(logit - max)
            total = logits.sum(0)
            loss += torch.where(valid, top + total.log() - target, 0.0).sum()
            if grad_scale is None or grad_h is None or grad_w is None:  # the loss only
                continue
            keep = valid.to(torch.float32) * grad_scale
            logits.mul_(keep / total)  # softmax x scale, zero for ignored rows
            logits[tgt, cols] -= keep
            g = logits.to(cdt)
            torch.mm(g.t(), w, out=grad_h[rows])  # (m, vocab) @ (vocab, d)
            if cdt == torch.float32:
                grad_w.addmm_(g, hc[rows])  # (vocab, m) @ (m, d)
            else:
                grad_w += torch.mm(g, hc[rows]).float()
    return loss, grad_h, grad_w


def _fused_head_rows(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    grad_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_fused_head` with gradients for bf16/fp16 matmuls on CPU: logits (chunk, vocab), one row each.

    oneDNN's low-precision matmuls run faster in this orientation than in fp32's (vocab, chunk) one:
    measured at the card's shapes, 405 against 325 GFLOP/s for the logits and 391 against 371 for h's
    gradient (the weight's runs at 323 against 357, less than a transposed (d, vocab) gradient would cost
    to turn). The max is taken on the low-precision logits, and the scaled gradient goes back into their
    buffer: the fp32 softmax costs two casting copies per chunk.
    """
    cdt = _matmul_dtype(h)
    n, vocab = h.size(0), weight.size(0)
    c = chunk_size(n, vocab)
    with torch.autocast("cpu", enabled=False):
        hc, w = h.to(cdt), weight.to(cdt)
        buf = torch.empty(c * vocab, dtype=torch.float32)  # exp(logit - max), then the gradient in fp32
        low = torch.empty(c * vocab, dtype=cdt)  # the logits, then their gradient
        loss = torch.zeros((), dtype=torch.float32)
        grad_h = torch.empty(h.shape, dtype=cdt)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32)
        for r in range(0, n, c):
            rows, yc = slice(r, min(n, r + c)), targets[r : r + c]
            m = len(yc)
            logits, e = low[: m * vocab].view(m, vocab), buf[: m * vocab].view(m, vocab)
            torch.mm(hc[rows], w.t(), out=logits)
            valid = yc != ignore_index
            cols, tgt = torch.arange(m), yc.clamp(min=0)
            target = logits[cols, tgt].float()
            top = logits.amax(1).float()
            e.copy_(logits).sub_(top[:, None]).exp_()
            total = e.sum(1)
            loss += torch.where(valid, top + total.log() - target, 0.0).sum()
            e[cols, tgt] -= total  # x keep / total below: softmax - one-hot, scaled
            logits.copy_(e.mul_((valid.to(torch.float32) * grad_scale / total)[:, None]))
            torch.mm(logits, w, out=grad_h[rows])  # (m, vocab) @ (vocab, d)
            grad_w += torch.mm(logits.t(), hc[rows])  # (vocab, m) @ (m, d)
    return loss, grad_h, grad_w


def _blocked_nll(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Each position's NLL (fp32, 0 where ignored) without gradients, one pass over the vocabulary in
    cache-sized blocks (CPU eval in fp32).

    Each (block, chunk) tile of logits is made, folded into a running max and sum of exponentials per
    position (the online softmax) and dropped while it is still in cache: one trip through memory for the
    logits instead of the three to four passes of a whole (vocab, chunk) softmax.
    """
    dev = h.device
    cdt = _matmul_dtype(h)
    n, vocab = h.size(0), weight.size(0)
    out = torch.zeros(n, dtype=torch.float32, device=dev)
    with torch.autocast(dev.type, enabled=False):
        hc, w = h.to(cdt), weight.to(cdt)
        for r in range(0, n, NLL_ROWS):
            hr, yr = hc[r : r + NLL_ROWS], targets[r : r + NLL_ROWS]
            m = len(yr)
            cols = torch.arange(m, device=dev)
            top = torch.full((m,), float("-inf"), device=dev)
            sumexp = torch.zeros(m, device=dev)
            target = torch.zeros(m, device=dev)
            for v in range(0, vocab, NLL_BLOCK):
                tile = torch.mm(w[v : v + NLL_BLOCK], hr.t()).float()  # (block, m)
                inside = (yr >= v) & (yr < v + tile.size(0))
                target = torch.where(inside, tile[(yr - v).clamp(0, tile.size(0) - 1), cols], target)
                new_top = torch.maximum(top, tile.amax(0))
                sumexp = sumexp.mul_((top - new_top).exp_()).add_(tile.sub_(new_top).exp_().sum(0))
                top = new_top
            nll = top + sumexp.log() - target
            out[r : r + m] = torch.where(yr != ignore_index, nll, 0.0)
    return out


def _rowwise_nll(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Each position's NLL without gradients, NLL_ROWS positions at a time (CPU evaluation in bf16/fp16,
    and any device for `reduction="none"`).

    Their logits come from one low-precision matmul and go through ATen's fused fp32 log-softmax. Once
    the matmul runs twice as fast as in fp32, `_blocked_nll`'s separate max/exp/sum passes per tile cost
    more than they save: measured 12% slower on the card's eval in bf16.
    """
    cdt = _matmul_dtype(h)  # before autocast is turned off below
    out = torch.zeros(h.size(0), dtype=torch.float32, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        hc, w = h.to(cdt), weight.to(cdt)
        for r in range(0, h.size(0), NLL_ROWS):
            logits = torch.mm(hc[r : r + NLL_ROWS], w.t()).float()
            out[r : r + NLL_ROWS] = F.cross_entropy(
                logits, targets[r : r + NLL_ROWS], ignore_index=ignore_index, reduction="none"
            )
    return out


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in the forward pass; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, mean: bool
    ) -> torch.Tensor:
        scale = (
            1.0 / (targets != ignore_index).sum().clamp(min=1) if mean else torch.ones((), device=h.device)
        )
        if h.device.type == "cpu" and _matmul_dtype(h) != torch.float32:
            loss, grad_h, grad_w = _fused_head_rows(h, weight, targets, ignore_index, scale)
        else:
            loss, grad_h, grad_w = _fused_head(h, weight, targets, ignore_index, scale)
        ctx.save_for_backward(grad_h.to(h.dtype), grad_w.to(weight.dtype))
        return loss * scale

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        grad_h, grad_w = ctx.saved_tensors
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

    h (N, d), weight (vocab, d), targets (N,) int64; reduction "mean" (over targets != ignore_index; 0 if
    there are none), "sum", or "none" (each position's NLL, 0 where ignored; evaluation only, no
    gradients). Under autocast the matmuls run in the autocast dtype and the softmax in fp32.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        if reduction == "none":
            raise ValueError("reduction 'none' is for evaluation: call it under torch.no_grad()")
        # torch declares Function.apply without types; the result is forward's loss
        loss: torch.Tensor = _LinearCrossEntropy.apply(  # type: ignore[no-untyped-call]
            h, weight, targets, ignore_index, reduction == "mean"
        )
        return loss
    if h.device.type == "cpu" and _matmul_dtype(h) == torch.float32:
        per_row = _blocked_nll(h, weight, targets, ignore_index)
    elif h.device.type == "cpu" or reduction == "none":
        per_row = _rowwise_nll(h, weight, targets, ignore_index)
    else:  # on a GPU the whole-vocabulary chunk is fewer, larger kernels
        return _reduce(
            _fused_head(h, weight, targets, ignore_index, None)[0], targets, ignore_index, reduction
        )
    if reduction == "none":
        return per_row
    return _reduce(per_row.sum(), targets, ignore_index, reduction)


def _reduce(total: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    return total if reduction == "sum" else total / (targets != ignore_index).sum().clamp(min=1)


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A bool mask shaped like x, False with probability round(p * 65536) / 65536."""
    n = x.numel()
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    uniform = bits.view(torch.int16)[:n].view(x.shape)  # uniform on [-2^15, 2^15)
    return uniform >= round(p * 65536) - 32768


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(x, p, training); on CPU with a 16-bit-threshold mask (see the module docstring)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not x.is_floating_point():
        return F.dropout(x, p, True)
    return torch.where(keep_mask(x, p), x, 0.0).mul_(1.0 / (1.0 - p))  # autograd keeps the bool mask


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: float = 0.0,
    n_blocks: int = ATTENTION_BLOCKS,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention with dropout p: q (B, nh, T, hs), k and v (B, nh, past + T, hs) -> (B, nh, T, hs).

    Query i sees keys 0 .. past + i: past = 0 is a whole sequence, past > 0 new tokens after a KV cache's
    prefix. It picks the kernel: SDPA, with no mask at all for one new token (it sees every key); on CPU
    with dropout, `blocked_causal_attention` (SDPA has no fused CPU kernel with dropout). An explicit
    `mask` (B, 1, T, keys) bool, True where a query sees a key, replaces the causal rule: a batch of
    streams whose rows hold different lengths.
    """
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    T, past = q.size(2), k.size(2) - q.size(2)
    if past == 0 and p > 0 and q.device.type == "cpu":
        return blocked_causal_attention(q, k, v, p, n_blocks)
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    if T == 1:  # one new token sees every cached position: no mask needed
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


def blocked_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float, n_blocks: int = ATTENTION_BLOCKS
) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(hs)) v with dropout p on the weights: (B, nh, T, hs) each -> (B, nh, T, hs).

    What SDPA's math path computes, written out so the dropout uses `keep_mask`: on CPU, SDPA has no fused
    kernel with dropout and its own mask draw took longer than the attention matmuls. The queries go in
    `n_blocks` row blocks, each against the keys up to its own end only, which skips most of the masked
    upper triangle: with 4 blocks, 5/8 of the (T, T) work (the timings at the card's shapes are in
    docs/benchmarks.md, "What changed"). The 1 / (1 - p) rescaling is applied to the (T, hs) output.
    """
    B, nh, T, hs = q.shape
    q, k, v = (t.reshape(B * nh, T, hs) for t in (q, k, v))
    size = -(-T // n_blocks)
    outs = []
    for start in range(0, T, size):
        end = min(T, start + size)
        # keys before the block are all visible; within it, key j is visible to query i when j <= i
        bias = torch.zeros(end - start, end, dtype=q.dtype, device=q.device)
        bias[:, start:].fill_(float("-inf")).triu_(1)
        scores = torch.baddbmm(bias, q[:, start:end], k[:, :end].transpose(1, 2), alpha=hs**-0.5)
        att = torch.softmax(scores, dim=-1)
        att = torch.where(keep_mask(att, p), att, 0.0)
        outs.append(torch.bmm(att, v[:, :end]))
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return y.mul_(1.0 / (1.0 - p)).view(B, nh, T, hs)
