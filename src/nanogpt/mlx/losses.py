"""The distillation losses in MLX: `nanogpt.distill.losses` and `nanogpt.distill.chunked`, function for function.

Everything here is pure MLX on arrays, so it runs inside the trainer's `mx.compile`d step; what a teacher
gives (its hidden states, an API's top-k log-probs, text it wrote) is computed before the step and arrives
as arrays. The dense loss is bounded in memory as in PyTorch: `chunked_parts` walks the positions a chunk
at a time from the final hidden states, and each chunk is an `mx.checkpoint`, so its (chunk, V) logits are
recomputed in the backward pass instead of kept: no (B, T, V) tensor of the student or the teacher exists.
Each function equals its PyTorch twin within 1e-5 (tests/mlx/test_distill.py).

    total, hard, soft = chunked_parts((h, head), (t_h, t_head), y, Mix(alpha=0.5, T=2.0))
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from nanogpt.config import ModelConfig

IGNORE = -100  # a target that is not scored (padding), as in `nanogpt.distill.chunked`
CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 4M fp32 = 16 MiB (the card's vocab: 83 positions); larger than
# torch's because each chunk is a node of the compiled graph, and fewer nodes compile faster

Parts = tuple[mx.array, mx.array, mx.array]  # (total, hard, soft): the loss and its two halves


def chunk_rows(n_rows: int, vocab: int) -> int:
    """Positions per chunk: as many as keep chunk x vocab within CHUNK_ELEMENTS, at least 1."""
    return max(1, min(n_rows, CHUNK_ELEMENTS // vocab))


def log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _kl_from_logprobs(logp: mx.array, logq: mx.array) -> mx.array:
    """KL(p || q) per row from log-probabilities (N, K) -> (N,); p = 0 terms contribute 0."""
    p = mx.exp(logp)
    safe = mx.where(p > 0, logp - logq, 0.0)  # no inf - inf where both are -inf
    return mx.sum(p * safe, axis=-1)


def divergence(logp: mx.array, logq: mx.array, name: str = "forward_kl", beta: float = 0.5) -> mx.array:
    """D(teacher p || student q) per row (N, K) -> (N,): forward_kl, reverse_kl or jsd (`distill.losses`)."""
    if name == "forward_kl":
        return _kl_from_logprobs(logp, logq)
    if name == "reverse_kl":
        return _kl_from_logprobs(logq, logp)
    if name == "jsd":
        logm = mx.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))
        return beta * _kl_from_logprobs(logp, logm) + (1 - beta) * _kl_from_logprobs(logq, logm)
    raise ValueError(f"unknown divergence {name!r}")  # the settings were checked before any MLX work


def _nll_rows(s: mx.array, y: mx.array) -> mx.array:
    """Per-row cross-entropy of logits s (m, V) against y (m,); rows with y = IGNORE give 0."""
    valid = y != IGNORE
    safe_y = mx.where(valid, y, 0)
    nll = mx.logsumexp(s, axis=-1) - mx.take_along_axis(s, safe_y[:, None], axis=-1)[:, 0]
    return mx.where(valid, nll, 0.0)


def _dense_chunk(
    t_h: mx.array, t_w: mx.array, y: mx.array, T: float, div: str, beta: float
) -> Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]:
    """One chunk's summed hard CE and summed divergence (without T^2) as a function of the student's hidden
    states and head only, recomputed in the backward pass. The teacher and the targets are captured, not
    passed: a checkpoint differentiates every argument, and the teacher's head needs no gradient."""

    def sums(h: mx.array, w: mx.array) -> tuple[mx.array, mx.array]:
        s = h @ w.T  # (m, V) student logits
        t = t_h @ t_w.T  # (m, V) teacher logits
        hard = mx.sum(_nll_rows(s, y))
        d = divergence(log_softmax(t / T), log_softmax(s / T), div, beta)
        return hard, mx.sum(mx.where(y != IGNORE, d, 0.0))

    return mx.checkpoint(sums)


def _ce_chunk(y: mx.array) -> Callable[[mx.array, mx.array], mx.array]:
    """One chunk's summed cross-entropy as a function of the hidden states and the head (targets captured)."""
    return mx.checkpoint(lambda h, w: mx.sum(_nll_rows(h @ w.T, y)))


def _rows(h: mx.array, vocab: int) -> list[slice]:
    n = h.shape[0]
    c = chunk_rows(n, vocab)
    return [slice(r, min(n, r + c)) for r in range(0, n, c)]


def chunked_ce(h: mx.array, w: mx.array, y: mx.array) -> mx.array:
    """Mean cross-entropy of the head `w` (V, d) on hidden states h (..., d) against y (...), a chunk of
    positions at a time (the fused training head's memory: no (N, V) logits kept for the backward pass)."""
    h, y = h.reshape(-1, h.shape[-1]), y.reshape(-1)
    total = sum((_ce_chunk(y[r])(h[r], w) for r in _rows(h, w.shape[0])), mx.array(0.0))
    return total / mx.maximum(mx.sum(y != IGNORE), 1)


def chunked_parts(
    student: tuple[mx.array, mx.array],
    teacher: tuple[mx.array, mx.array],
    targets: mx.array,
    alpha: float = 0.5,
    T: float = 1.0,
    divergence_name: str = "forward_kl",
    beta: float = 0.5,
) -> Parts:
    """`distill.chunked.chunked_distill_parts` in MLX: student (h (..., d), head (V, d)), teacher (h (..., d_t),
    head (V, d_t)), targets (...) with IGNORE for unscored positions; means over the scored positions."""
    (h, w), (t_h, t_w) = student, teacher
    h, t_h, y = h.reshape(-1, h.shape[-1]), t_h.reshape(-1, t_h.shape[-1]), targets.reshape(-1)
    hard_sum, soft_sum = mx.array(0.0), mx.array(0.0)
    for r in _rows(h, w.shape[0]):
        hard, soft = _dense_chunk(t_h[r], t_w, y[r], T, divergence_name, beta)(h[r], w)
        hard_sum, soft_sum = hard_sum + hard, soft_sum + soft
    scored = mx.maximum(mx.sum(y != IGNORE), 1)
    hard, soft = hard_sum / scored, (T * T) * soft_sum / scored
    return alpha * hard + (1 - alpha) * soft, hard, soft


def bucket_logprobs(logits: mx.array, ids: mx.array, valid: mx.array) -> tuple[mx.array, mx.array]:
    """Student log-probs on the teacher's k buckets and on the rest: (N, V), (N, k) -> (N, k), (N,)
    (`distill.losses.bucket_logprobs`: the rest as a logsumexp over the other logits, stable)."""
    logz = mx.logsumexp(logits, axis=-1, keepdims=True)
    logq_k = mx.take_along_axis(logits, ids, axis=-1) - logz
    hits = mx.zeros(logits.shape, dtype=mx.float32)
    rows = mx.broadcast_to(mx.arange(ids.shape[0])[:, None], ids.shape)
    hits = hits.at[rows, ids].add(valid.astype(mx.float32))  # scatter-add, as torch's scatter_add
    rest = mx.logsumexp(mx.where(hits > 0, -mx.inf, logits), axis=-1) - logz[:, 0]
    return mx.where(valid, logq_k, 0.0), rest


def sparse_kl(
    logits: mx.array,
    ids: mx.array,
    logprobs: mx.array,
    T: float,
    valid: mx.array,
    row_mask: mx.array,
) -> mx.array:
    """KL(teacher || student) over the teacher's top-k plus a rest bucket (`distill.losses.sparse_kl`), the mean
    over the kept positions: logits (..., V), ids/logprobs/valid (..., k), row_mask (...)."""
    V, k = logits.shape[-1], ids.shape[-1]
    s, ids = logits.reshape(-1, V), ids.reshape(-1, k)
    ok = valid.reshape(-1, k)
    lp = mx.where(ok, logprobs.reshape(-1, k).astype(s.dtype), -mx.inf)
    rest_p = mx.maximum(1.0 - mx.sum(mx.exp(lp), axis=-1), 0.0)
    logp = mx.concatenate([lp, mx.log(rest_p)[:, None]], axis=-1)
    logq_k, logq_rest = bucket_logprobs(s, ids, ok)
    logq = mx.concatenate([mx.where(ok, logq_k, -mx.inf), logq_rest[:, None]], axis=-1)
    if T != 1.0:
        logp, logq = log_softmax(logp / T), log_softmax(logq / T)
    safe_logq = mx.where(mx.isinf(logq), 0.0, logq)  # only where p = 0 too
    kl = (T * T) * _kl_from_logprobs(logp, safe_logq)
    keep = row_mask.reshape(-1)
    return mx.sum(mx.where(keep, kl, 0.0)) / mx.maximum(mx.sum(keep), 1)


def uld_distance(student_logits: mx.array, teacher_sorted: mx.array, T: float = 1.0) -> mx.array:
    """The ULD distance per row (`distill.losses.uld_distance`), with the teacher's probabilities already
    softmaxed at T and sorted in decreasing order (they carry no gradient): (N, V_s), (N, V_t) -> (N,)."""
    q = -mx.sort(-mx.softmax(student_logits / T, axis=-1), axis=-1)  # decreasing
    p = teacher_sorted.astype(q.dtype)
    V = max(q.shape[-1], p.shape[-1])
    q = mx.pad(q, [(0, 0), (0, V - q.shape[-1])])
    p = mx.pad(p, [(0, 0), (0, V - p.shape[-1])])
    return mx.sum(mx.abs(p - q), axis=-1)


def head_weight(model: object, cfg: ModelConfig) -> mx.array:
    """A NanoGPTLMHeadModel's output head (V, d): the token table when tied (MLX keeps no lm_head then)."""
    if cfg.tie_embeddings:
        return model.transformer.token_embedding.weight  # type: ignore[attr-defined]
    return model.lm_head.weight  # type: ignore[attr-defined]
