"""Knowledge distillation losses: pure functions on logits (the halves a loss keeps: `train.losses.LossLog`).

The card's second stage trains the student for 15,000 iterations at lr 3e-5 on
`alpha * CE(student, data) + (1 - alpha) * T^2 * D(teacher_T || student_T)`. Which divergence D can be
computed depends on what the teacher exposes (see `nanogpt.distill.teachers`):

- a local same-vocabulary teacher gives full-vocabulary soft targets: `distill_parts` (its `.total` is the loss)
  with D = forward KL, reverse KL or JSD (`divergence`);
- an API teacher serving our tokenizer gives prompt-token top-k logprobs: `sparse_kl`, top-k + one
  "rest of the mass" bucket;
- a chat API with any tokenizer gives text only: sequence-level KD with the plain hard loss;
- a local teacher with another vocabulary gives full distributions over *its* tokens: `uld_loss`, the
  Universal Logit Distillation loss on sorted probabilities (positions aligned by `nanogpt.distill.uld`).

    loss = distill_parts(student_logits, targets, teacher_logits, alpha=0.5, T=2.0, divergence_name="forward_kl").total
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanogpt.errors import SettingError, UserError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
# what a local teacher of any vocabulary can give instead of a same-vocabulary divergence
CROSS_VOCAB_METHODS = ("uld", "sequence")
TEACHER_SPECS = (
    "a local teacher (nanogpt run, Hugging Face folder or .gguf file; one with another vocabulary takes "
    "`method` sequence or `method` uld), completions:MODEL@URL (token-level API serving our tokenizer), or "
    "chat:MODEL@URL (sequence-level, any tokenizer)"
)


# --- the losses: pure functions on logits -------------------------------------------------------------------


@dataclass(frozen=True)
class LossParts:
    """The combined loss and its two halves (scalars; `soft` already carries the T^2 factor)."""

    total: torch.Tensor
    hard: torch.Tensor
    soft: torch.Tensor


def _kl_from_logprobs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities (N, K) -> (N,); p = 0 terms contribute 0."""
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(-1)


def divergence(
    logp: torch.Tensor, logq: torch.Tensor, name: str = "forward_kl", beta: float = 0.5
) -> torch.Tensor:
    """D(teacher p || student q) per row, from log-probabilities (N, K) -> (N,).

    forward_kl: KL(p||q) (mass-covering, classic KD); reverse_kl: KL(q||p) (mode-seeking);
    jsd: beta*KL(p||m) + (1-beta)*KL(q||m) with m = beta*p + (1-beta)*q (bounded, symmetric at 0.5).
    """
    if name == "forward_kl":
        return _kl_from_logprobs(logp, logq)
    if name == "reverse_kl":
        return _kl_from_logprobs(logq, logp)
    if name == "jsd":
        if not 0.0 < beta < 1.0:
            raise SettingError("beta", f"jsd beta={beta} must be in (0, 1); e.g. `beta` 0.5")
        logm = torch.logsumexp(torch.stack([logp + math.log(beta), logq + math.log(1 - beta)]), dim=0)
        return beta * _kl_from_logprobs(logp, logm) + (1 - beta) * _kl_from_logprobs(logq, logm)
    raise UserError(f"unknown divergence {name!r}; use one of {', '.join(DIVERGENCES)}")


def distill_parts(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float = 0.5,
    T: float = 1.0,
    divergence_name: str = "forward_kl",
    beta: float = 0.5,
) -> LossParts:
    """alpha * CE(student, targets) + (1 - alpha) * T^2 * D(teacher_T || student_T) and its two halves:
    logits (..., V), targets (...) int64; means over positions."""
    V = student_logits.size(-1)
    if teacher_logits.size(-1) != V:
        raise SettingError(
            "teacher",
            f"teacher has {teacher_logits.size(-1)} logits per token, the student {V}; " + TEACHER_SPECS,
        )
    s = student_logits.reshape(-1, V)  # (N, V)
    hard = F.cross_entropy(s, targets.reshape(-1))
    logq = F.log_softmax(s / T, dim=-1)
    logp = F.log_softmax(teacher_logits.reshape(-1, V).to(s.dtype) / T, dim=-1)
    # T^2 keeps the soft gradient's size independent of T (Hinton et al. 2015)
    soft = (T * T) * divergence(logp, logq, divergence_name, beta).mean()
    return LossParts(alpha * hard + (1 - alpha) * soft, hard, soft)


def bucket_logprobs(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student log-probs on the teacher's k buckets and on the rest: (N, V), (N, k) -> (N, k), (N,).

    The rest is log(1 - sum q over the valid ids), computed as a logsumexp over the other logits (stable
    even when the top-k hold nearly all the mass). Invalid (padding) buckets get log-prob 0 (ignored).
    """
    logz = torch.logsumexp(student_logits, dim=-1, keepdim=True)  # (N, 1)
    logq_k = student_logits.gather(-1, topk_ids) - logz  # (N, k)
    in_topk = torch.zeros_like(student_logits).scatter_add(-1, topk_ids, valid.to(student_logits.dtype)) > 0
    rest_logits = student_logits.masked_fill(in_topk, float("-inf"))
    logq_rest = torch.logsumexp(rest_logits, dim=-1) - logz.squeeze(-1)  # (N,)
    return torch.where(valid, logq_k, torch.zeros_like(logq_k)), logq_rest


def sparse_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    T: float = 1.0,
    valid: torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k tokens plus one "rest of the mass" bucket.

    student_logits (..., V); topk_ids (..., k) int64; topk_logprobs (..., k) the teacher's log-probs at
    temperature 1. Teacher rest = 1 - sum p_topk, student rest = 1 - sum q over the same ids, so this is
    a proper divergence between two (k+1)-bucket distributions: >= 0, and 0 iff they agree on every
    bucket. `valid` (..., k) marks real entries (padding is excluded from the buckets); `row_mask` (...)
    drops whole positions (a skipped teacher answer). With T != 1 both bucket distributions are tempered
    the same way (bucket log-probs / T, renormalised) and the result is scaled by T^2, like the dense loss.
    Returns the mean over kept positions (0 when none is kept).
    """
    V, k = student_logits.size(-1), topk_ids.size(-1)
    s = student_logits.reshape(-1, V)
    ids = topk_ids.reshape(-1, k)
    lp = topk_logprobs.reshape(-1, k).to(s.dtype)
    ok = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.reshape(-1, k)
    lp = torch.where(ok, lp, torch.full_like(lp, float("-inf")))
    # teacher rest mass; rounding in an API's logprobs can push sum p over 1: clamp to 0
    rest_p = (1.0 - lp.exp().sum(-1)).clamp(min=0.0)
    logp = torch.cat([lp, rest_p.log()[:, None]], dim=-1)  # (N, k+1), -inf where p = 0
    logq_k, logq_rest = bucket_logprobs(s, ids, ok)
    logq = torch.cat(
        [torch.where(ok, logq_k, torch.full_like(logq_k, float("-inf"))), logq_rest[:, None]], -1
    )
    if T != 1.0:
        logp, logq = F.log_softmax(logp / T, dim=-1), F.log_softmax(logq / T, dim=-1)
    safe_logq = torch.where(torch.isfinite(logq), logq, torch.zeros_like(logq))  # only where p = 0 too
    kl = (T * T) * _kl_from_logprobs(logp, safe_logq)  # (N,)
    keep = torch.ones_like(kl, dtype=torch.bool) if row_mask is None else row_mask.reshape(-1)
    n = keep.sum()
    return torch.where(keep, kl, torch.zeros_like(kl)).sum() / n.clamp(min=1)


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """The Universal Logit Distillation distance per row: (N, V_s), (N, V_t) -> (N,), any two vocabularies.

    Boizard et al., 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for
    LLMs" (arXiv:2402.12030). With q = softmax(student / T) and p = softmax(teacher / T), each sorted in
    decreasing order and the shorter padded with zeros to V = max(V_s, V_t):

        ULD(p, q) = sum_{i=1..V} | p_(i) - q_(i) |

    the paper's closed form of the Wasserstein-1 distance between the two distributions when every token
    is one unit from every other (uniform support and cost). No token correspondence is needed: the
    result is invariant to permuting either vocabulary, 0 iff the sorted distributions are equal, and at
    most 2. Gradients flow through the sort (to the student's logits, rank by rank).
    """
    q = F.softmax(student_logits / T, dim=-1).sort(dim=-1, descending=True).values
    p = F.softmax(teacher_logits.to(q.dtype) / T, dim=-1).sort(dim=-1, descending=True).values
    V = max(q.size(-1), p.size(-1))
    q, p = F.pad(q, (0, V - q.size(-1))), F.pad(p, (0, V - p.size(-1)))
    return (p - q).abs().sum(-1)


def uld_parts(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    positions: torch.Tensor,
    alpha: float = 0.5,
    T: float = 1.0,
) -> LossParts:
    """alpha * CE(student, targets) + (1 - alpha) * mean ULD over the aligned positions.

    student_logits (..., V_s) and targets (...): the hard loss covers every position. teacher_logits
    (N, V_t) are the teacher's rows for the N aligned positions, `positions` (N,) their flat indices into
    the student's positions. No T^2 factor: ULD is a bounded distance, not a KL. With no aligned position
    the soft half is 0.
    """
    V = student_logits.size(-1)
    s = student_logits.reshape(-1, V)
    hard = F.cross_entropy(s, targets.reshape(-1))
    if positions.numel() == 0:
        soft = torch.zeros((), dtype=s.dtype, device=s.device)
    else:
        soft = uld_distance(s[positions], teacher_logits, T).mean()
    return LossParts(alpha * hard + (1 - alpha) * soft, hard, soft)


def check_distill_settings(
    alpha: float, T: float, method: str, beta: float, methods: tuple[str, ...] = DIVERGENCES
) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise SettingError(
            "alpha", f"alpha={alpha} must be in [0, 1] (the weight of the hard loss); e.g. `alpha` 0.5"
        )
    if not (math.isfinite(T) and T > 0):
        raise SettingError("temperature", f"temperature={T} must be > 0; e.g. `temperature` 2")
    if method not in methods:
        raise UserError(f"unknown divergence {method!r}; use one of {', '.join(methods)}")
    if method == "jsd" and not 0.0 < beta < 1.0:
        raise SettingError("beta", f"jsd beta={beta} must be in (0, 1); e.g. `beta` 0.5")
