"""Knowledge distillation: the losses, local teachers, and the `nanogpt distill` command.

The card's second stage trains the student for 15,000 iterations at lr 3e-5 on
`alpha * CE(student, data) + (1 - alpha) * T^2 * D(teacher_T || student_T)`. Which divergence D can be
computed depends on what the teacher exposes, so a teacher SPEC picks one of three real paths:

- a local folder (a nanogpt run/checkpoint, or a Hugging Face causal LM with GPT-2's 50,257-token
  vocabulary): full-vocabulary soft targets on the fly, under no_grad, teacher in eval mode;
- `completions:MODEL@BASE_URL`: an OpenAI-compatible /v1/completions server for a model with *our*
  tokenizer that returns prompt-token top-k logprobs (`nanogpt serve`, vLLM, llama.cpp): sparse top-k KD
  (`sparse_kl`, top-k + one "rest of the mass" bucket), see `nanogpt.distill.api`;
- `chat:MODEL@BASE_URL`: any chat API with any tokenizer (the card's GPT-OSS-20B on Groq): no logprobs
  exist, so the teacher writes continuations of corpus prompts and the student learns them with the
  hard loss (sequence-level KD), mixed `alpha` : `1 - alpha` with the original data.

Every path goes through `nanogpt.train.loop.train(..., init_from=student, loss_fn=...)`, so checkpoints, exact
resume, eval, logs and plots are the trainer's.

    nanogpt distill --student runs/base --teacher runs/big --data data/builtin --out runs/kd --max-iters 500
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanogpt.config import ModelConfig, TrainConfig, override, read_json
from nanogpt.data.tokenizer import VOCAB_SIZE
from nanogpt.distill.client import ApiConfig, cached_answers, check_base_url
from nanogpt.errors import ArgumentParser, UserError, missing_extra
from nanogpt.folders import claim, has_checkpoint
from nanogpt.kernels.device import autocast, resolve_device, set_threads, torch_dtype

KINDS = ("forward_kl", "reverse_kl", "jsd")
TEACHER_KINDS = (
    "a same-vocabulary local teacher (nanogpt run or Hugging Face folder with GPT-2's 50,257 tokens), "
    "completions:MODEL@URL (token-level API serving our tokenizer), or chat:MODEL@URL (sequence-level, any tokenizer)"
)
# `--preset card`: the card's distillation stage. Without it the same lr applies (the card's 3e-5).
DISTILL_PRESETS: dict[str, dict[str, Any]] = {
    "card": dict(
        max_iters=15000,
        learning_rate=3e-5,
        min_lr=3e-5,
        warmup_iters=0,
        batch_size=12,
        distill_alpha=0.5,
        distill_temperature=1.0,
    ),
}
TEACHER_DEFAULTS: dict[str, Any] = {
    "teacher": None,
    "kind": "forward_kl",
    "beta": 0.5,
    "top_k": 20,
    "prompts": 256,
    "prompt_tokens": 64,
    "reply_tokens": 256,
}
BASE_TRAIN = TrainConfig(learning_rate=3e-5, min_lr=3e-5, warmup_iters=0, max_iters=15000)


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
    logp: torch.Tensor, logq: torch.Tensor, kind: str = "forward_kl", beta: float = 0.5
) -> torch.Tensor:
    """D(teacher p || student q) per row, from log-probabilities (N, K) -> (N,).

    forward_kl: KL(p||q) (mass-covering, classic KD); reverse_kl: KL(q||p) (mode-seeking);
    jsd: beta*KL(p||m) + (1-beta)*KL(q||m) with m = beta*p + (1-beta)*q (bounded, symmetric at 0.5).
    """
    if kind == "forward_kl":
        return _kl_from_logprobs(logp, logq)
    if kind == "reverse_kl":
        return _kl_from_logprobs(logq, logp)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise UserError(f"jsd beta={beta} must be in (0, 1); e.g. --beta 0.5")
        logm = torch.logsumexp(torch.stack([logp + math.log(beta), logq + math.log(1 - beta)]), dim=0)
        return beta * _kl_from_logprobs(logp, logm) + (1 - beta) * _kl_from_logprobs(logq, logm)
    raise UserError(f"unknown divergence kind {kind!r}; use one of {', '.join(KINDS)}")


def distill_parts(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float = 0.5,
    T: float = 1.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
) -> LossParts:
    """`distill_loss` with its halves: logits (..., V), targets (...) int64; means over positions."""
    V = student_logits.size(-1)
    if teacher_logits.size(-1) != V:
        raise UserError(
            f"teacher has {teacher_logits.size(-1)} logits per token, the student {V}; " + TEACHER_KINDS
        )
    s = student_logits.reshape(-1, V)  # (N, V)
    hard = F.cross_entropy(s, targets.reshape(-1))
    logq = F.log_softmax(s / T, dim=-1)
    logp = F.log_softmax(teacher_logits.reshape(-1, V).to(s.dtype) / T, dim=-1)
    # T^2 keeps the soft gradient's size independent of T (Hinton et al. 2015)
    soft = (T * T) * divergence(logp, logq, kind, beta).mean()
    return LossParts(alpha * hard + (1 - alpha) * soft, hard, soft)


def distill_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float = 0.5,
    T: float = 1.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """alpha * CE(student, targets) + (1 - alpha) * T^2 * D(teacher_T || student_T), a scalar."""
    return distill_parts(student_logits, targets, teacher_logits, alpha, T, kind, beta).total


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


# --- local teachers ------------------------------------------------------------------------------------------


class LocalTeacher:
    """A frozen same-vocabulary model: `logits(x)` (B, T) -> (B, T, 50257) float32, no grad."""

    def __init__(self, module: nn.Module, kind: str, context_length: int, dtype: str = "fp32") -> None:
        self.module, self.kind, self.context_length, self.dtype = module.eval(), kind, context_length, dtype
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(1) > self.context_length:
            raise UserError(
                f"the teacher's context is {self.context_length} tokens, the student's windows are {x.size(1)}; "
                "use a teacher with at least the student's context"
            )
        device = next(self.module.parameters()).device
        with autocast(device, self.dtype):
            out = self.module(x.to(device))
        logits = out if self.kind == "nanogpt" else out.logits
        return logits[..., :VOCAB_SIZE].float()


def _gpt2_vocab_ok(folder: Path) -> bool | None:
    """Whether a HF folder's tokenizer vocabulary is GPT-2's (None when it ships no vocab.json)."""
    vocab = folder / "vocab.json"
    if not vocab.is_file():
        return None
    from nanogpt.data.tokenizer import bpe_files

    return json.loads(vocab.read_text()) == json.loads(bpe_files()[0].read_text())


def load_local_teacher(
    path: str | Path, device: str | torch.device = "cpu", dtype: str = "fp32"
) -> LocalTeacher:
    """A nanogpt run/checkpoint folder or a Hugging Face causal-LM folder (offline), checked for our vocab."""
    from nanogpt.train.checkpoint import CONFIG, load_model, resolve_checkpoint

    p = Path(path)
    torch_dtype(dtype)
    if not p.exists():
        raise UserError(
            f"teacher {p} not found; the teacher SPEC is a local folder or one of: {TEACHER_KINDS}"
        )
    cfg_file = p / CONFIG
    hf = cfg_file.is_file() and "model_type" in json.loads(cfg_file.read_text())
    if not hf:
        folder = resolve_checkpoint(p)
        cfg = ModelConfig.load(folder / CONFIG)
        if cfg.vocab_size != VOCAB_SIZE:
            raise UserError(
                f"teacher {p} has vocab_size {cfg.vocab_size}, not GPT-2's {VOCAB_SIZE}; use " + TEACHER_KINDS
            )
        model = load_model(folder, device=device)
        return LocalTeacher(model, "nanogpt", cfg.context_length, dtype)
    hf_cfg = json.loads(cfg_file.read_text())
    vocab = hf_cfg.get("vocab_size")
    if vocab != VOCAB_SIZE or _gpt2_vocab_ok(p) is False:
        raise UserError(
            f"teacher {p} uses another tokenizer (vocab {vocab}, model_type {hf_cfg.get('model_type')!r}); "
            f"its distributions cannot be matched token by token; use {TEACHER_KINDS}"
        )
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise missing_extra("a Hugging Face teacher needs transformers", "hf") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the Hugging Face teacher {p}: {str(e).splitlines()[0]}") from None
    ctx = int(hf_cfg.get("n_positions") or hf_cfg.get("max_position_embeddings") or 10**9)
    return LocalTeacher(model.to(device), "hf", ctx, dtype)


class DistillLossFn:
    """The trainer's `loss_fn` for a local teacher: dense KD on the full vocabulary.

    Keeps the last hard/soft halves of every call in `history` (and appends them to `log_path`, rank 0)
    so that what the soft loss does is measurable, not only the combined loss the trainer logs.
    """

    def __init__(
        self,
        teacher: LocalTeacher,
        alpha: float = 0.5,
        T: float = 1.0,
        kind: str = "forward_kl",
        beta: float = 0.5,
        log_path: Path | None = None,
    ) -> None:
        check_distill_settings(alpha, T, kind, beta)
        self.teacher, self.alpha, self.T, self.kind, self.beta = teacher, alpha, T, kind, beta
        self.log_path, self.history = log_path, []

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)  # (B, T, V)
        t_logits = self.teacher.logits(x)  # (B, T, V), no grad
        parts = distill_parts(logits.float(), y, t_logits, self.alpha, self.T, self.kind, self.beta)
        record_parts(self, parts)
        return parts.total


def record_parts(loss_fn: Any, parts: LossParts, **extra: Any) -> None:
    """Append a call's hard/soft halves to `loss_fn.history` and, on rank 0, to its JSONL log."""
    step = getattr(loss_fn, "step", 0)  # set by the trainer (optim.LossFn): trims this log on resume
    rec = {"step": step, "hard": float(parts.hard.detach()), "soft": float(parts.soft.detach()), **extra}
    loss_fn.history.append(rec)
    if loss_fn.log_path is not None and int(os.environ.get("RANK", 0)) == 0:
        with open(loss_fn.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def check_distill_settings(alpha: float, T: float, kind: str, beta: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha={alpha} must be in [0, 1] (the weight of the hard loss); e.g. --alpha 0.5")
    if not (math.isfinite(T) and T > 0):
        raise UserError(f"temperature={T} must be > 0; e.g. --temperature 2")
    if kind not in KINDS:
        raise UserError(f"unknown divergence kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise UserError(f"jsd beta={beta} must be in (0, 1); e.g. --beta 0.5")


# --- the command -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed --teacher: kind "local" (path), "completions" or "chat" (model @ base URL)."""

    kind: str
    path: str = ""
    model: str = ""
    base_url: str = ""


def parse_teacher(spec: str) -> TeacherSpec:
    for kind in ("completions", "chat"):
        if spec.startswith(kind + ":"):
            # MODEL ends at the first "@scheme://" (a model name may hold "@", a URL's user:password part too)
            m = re.fullmatch(r"(.+?)@([A-Za-z][A-Za-z0-9+.-]*://.*)", spec[len(kind) + 1 :], re.S)
            if m is None:
                raise UserError(
                    f"--teacher {spec!r}: write {kind}:MODEL@BASE_URL, e.g. {kind}:gpt2@http://127.0.0.1:8000/v1"
                )
            return TeacherSpec(kind, model=m[1], base_url=check_base_url(m[2]))
    if spec.startswith(("http://", "https://")):
        raise UserError(f"--teacher {spec!r} is a URL; write completions:MODEL@URL or chat:MODEL@URL")
    return TeacherSpec("local", path=spec)


def build_parser() -> argparse.ArgumentParser:
    from nanogpt.commands.train import add_train_config_flags

    p = ArgumentParser(
        prog="nanogpt distill",
        description="Distil a teacher into a student checkpoint (the card's second stage). Teacher SPEC: "
        + TEACHER_KINDS,
    )
    p.add_argument("--student", help="student run or checkpoint folder (its weights start the run)")
    p.add_argument("--teacher", help="teacher SPEC: a folder, completions:MODEL@URL or chat:MODEL@URL")
    p.add_argument("--data", help="prepared data folder (`nanogpt prepare`)")
    p.add_argument("--out", required=True, help="run folder to create (or continue with --resume)")
    p.add_argument("--preset", choices=list(DISTILL_PRESETS), help="card: 15K iterations, lr 3e-5, alpha 0.5")
    p.add_argument("--alpha", type=float, help="weight of the hard loss (default 0.5)")
    p.add_argument("--temperature", type=float, help="softmax temperature T (default 1)")
    p.add_argument("--kind", choices=KINDS, help="divergence (local teacher; default forward_kl)")
    p.add_argument("--beta", type=float, help="jsd mixture weight (default 0.5)")
    p.add_argument(
        "--teacher-dtype", choices=["fp32", "bf16"], default="fp32", help="local teacher precision"
    )
    p.add_argument("--resume", action="store_true", help="continue OUT from OUT/last/")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace whatever is at --out (else only a run with no checkpoint)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    api = p.add_argument_group("API teachers (completions:/chat:)")
    # defaults in TEACHER_DEFAULTS; None = unset, so that --resume keeps the run's own settings
    api.add_argument("--top-k", type=int, help="top-k logprobs asked per position (completions; default 20)")
    api.add_argument(
        "--api-key-env",
        help="env var holding the API key, which must then be set (never logged; default: OPENAI_API_KEY if set)",
    )
    api.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    api.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    api.add_argument("--retries", type=int, default=5, help="retries per request (exponential backoff)")
    api.add_argument("--skip-bad", action="store_true", help="count and skip bad answers instead of stopping")
    api.add_argument("--cache-dir", help="teacher answers cache + chat data (default: OUT.teacher)")
    api.add_argument("--prompts", type=int, help="chat: prompts drawn from the training split (default 256)")
    api.add_argument("--prompt-tokens", type=int, help="chat: tokens per prompt (default 64)")
    api.add_argument("--reply-tokens", type=int, help="chat: max_tokens per teacher reply (default 256)")
    add_train_config_flags(p, skip_prefix="distill_")  # defaults: the card's distillation stage
    return p


def resolve_train_config(args: argparse.Namespace) -> TrainConfig:
    """BASE_TRAIN, then the run's saved config on --resume, then --preset, then flags."""
    cfg = BASE_TRAIN
    saved = Path(args.out) / "train_config.json"
    if args.resume and saved.is_file():
        cfg = TrainConfig.from_dict(read_json(saved, "training config"))
    if args.preset:
        cfg = override(cfg, **DISTILL_PRESETS[args.preset])
    flags = {
        f.name: getattr(args, f.name, None) for f in fields(TrainConfig) if not f.name.startswith("distill_")
    }
    return override(cfg, **flags, distill_alpha=args.alpha, distill_temperature=args.temperature)


def make_loss_fn(
    spec: TeacherSpec, args: argparse.Namespace, cfg: TrainConfig, model_cfg: ModelConfig, cache_dir: Path
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The trainer's loss_fn for this teacher; a chat teacher writes its data set first."""
    alpha, T = cfg.distill_alpha, cfg.distill_temperature
    check_distill_settings(alpha, T, args.kind, args.beta)
    log_path = cache_dir / "distill_log.jsonl"
    if spec.kind == "local":
        teacher = load_local_teacher(spec.path, resolve_device(cfg.device), args.teacher_dtype)
        return DistillLossFn(teacher, alpha, T, args.kind, args.beta, log_path)
    from nanogpt.distill import api as teachers

    client = teachers.ApiClient(
        api_config(spec, args),
        teachers.AnswerCache(cache_dir / "cache.sqlite"),
        down_hint=lambda: rerun_hint(Path(args.out)),
    )
    if spec.kind == "completions":
        return teachers.TopKDistillLoss(
            client, args.top_k, alpha, T, skip_bad=args.skip_bad, log_path=log_path
        )
    data = teachers.build_chat_data(
        client,
        args.data,
        cache_dir / "chat_data",
        n_prompts=args.prompts,
        prompt_tokens=args.prompt_tokens,
        reply_tokens=args.reply_tokens,
        seed=cfg.seed,
        skip_bad=args.skip_bad,
    )
    return teachers.MixedDataLoss(data, model_cfg.context_length, alpha, log_path=log_path)


def api_config(spec: TeacherSpec, args: argparse.Namespace) -> ApiConfig:
    """The client settings of an API teacher (range-checked by ApiConfig)."""
    return ApiConfig(
        base_url=spec.base_url,
        model=spec.model,
        api_key_env=args.api_key_env or "OPENAI_API_KEY",
        concurrency=args.concurrency,
        timeout=args.timeout,
        retries=args.retries,
        key_required=args.api_key_env is not None,
    )


def rerun_hint(run: Path) -> str:
    """What to do once a down teacher is back: --resume only when OUT holds a checkpoint to resume."""
    if has_checkpoint(run):
        return "then rerun with --resume (answers already received are cached)"
    return "then rerun the same command once it is reachable (answers already received are cached)"


# flag -> (lowest, highest) for the integer teacher settings; top-k's range is TopKDistillLoss's
TEACHER_INT_RANGES = {
    "top_k": (1, VOCAB_SIZE),
    "prompts": (1, 10**6),
    "prompt_tokens": (4, 10**5),
    "reply_tokens": (1, 10**6),
}


def resolve_teacher_settings(args: argparse.Namespace, saved: Path) -> TeacherSpec:
    """Fill unset teacher flags from the run's distill.json (on --resume), else TEACHER_DEFAULTS; check them
    all (nothing is written for a bad one), save them, and return the parsed --teacher."""
    if saved.parent.exists() and not saved.parent.is_dir():
        raise UserError(f"teacher folder {saved.parent} is a file; move it away or give another --cache-dir")
    try:
        old = json.loads(saved.read_text()) if args.resume and saved.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        old = e
    if not isinstance(old, dict):
        raise UserError(
            f"the run's teacher settings {saved} are unreadable; restore that file, or pass --teacher and the "
            "other teacher flags again after moving it away"
        )
    for name, default in TEACHER_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, old.get(name, default))
    if args.teacher is None:
        raise UserError("--teacher SPEC is required: a local folder, completions:MODEL@URL or chat:MODEL@URL")
    if not isinstance(args.teacher, str):  # only a hand-edited distill.json gets here
        raise UserError(f"{saved} holds a teacher that is not a SPEC string; pass --teacher SPEC again")
    spec = parse_teacher(args.teacher)
    for name, (lo, hi) in TEACHER_INT_RANGES.items():
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {value!r} is out of range: give an integer in [{lo}, {hi}]")
    api = api_config(spec, args)  # ranges of --timeout, --retries, --concurrency
    if spec.kind != "local":
        api.api_key()  # an unset --api-key-env variable stops the run before anything is written
    saved.parent.mkdir(parents=True, exist_ok=True)
    record = {name: getattr(args, name) for name in TEACHER_DEFAULTS}
    saved.write_text(json.dumps({**record, "student": args.student or old.get("student")}, indent=2) + "\n")
    return spec


def drop_unused_teacher_folder(cache_dir: Path, run: Path) -> None:
    """After a failed run that created `cache_dir`: remove it unless it holds answers, data or a log worth
    keeping, or OUT has a checkpoint whose --resume needs its distill.json."""
    from nanogpt.train.checkpoint import STATE_JSON, recover_dir

    kept = ("distill_log.jsonl", "chat_data")
    if (recover_dir(run / "last") / STATE_JSON).is_file() or any((cache_dir / k).exists() for k in kept):
        return
    if cached_answers(cache_dir / "cache.sqlite") == 0:
        shutil.rmtree(cache_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from nanogpt.train.checkpoint import load_config_of, saved_data_dir
    from nanogpt.train.loop import train

    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    run = Path(args.out)
    if not args.resume and not args.student:
        raise UserError(
            "--student RUN is required: the checkpoint whose weights the distillation starts from"
        )
    model_cfg = load_config_of(run if args.resume and (run / "config.json").is_file() else args.student)
    cfg = resolve_train_config(args)
    data = args.data
    if data is None and args.resume:
        data = args.data = saved_data_dir(run)
    if data is None:
        raise UserError("--data DIR is required: a folder made by `nanogpt prepare`")
    cache_dir = Path(args.cache_dir) if args.cache_dir else run.with_name(run.name + ".teacher")
    if not args.resume:  # before any teacher work: train() checks again, under the run lock
        claim(run, "run", force=args.force)
    created = not cache_dir.exists()
    try:
        spec = resolve_teacher_settings(args, cache_dir / "distill.json")
        loss_fn = make_loss_fn(spec, args, cfg, model_cfg, cache_dir)
        result = train(
            model_cfg,
            cfg,
            data,
            run,
            resume=args.resume,
            force=args.force,
            init_from=args.student,
            progress=not args.no_progress,
            loss_fn=loss_fn,
        )
    except BaseException:
        if created:  # a failed run leaves no empty OUT.teacher/ behind, and never touches an earlier one
            drop_unused_teacher_folder(cache_dir, run)
        raise
    skipped = getattr(loss_fn, "skipped", 0)
    best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
    print(
        f"{result.run_dir}: {result.steps} distillation steps, best val loss {best}"
        + (f", {skipped} teacher answers skipped" if skipped else ""),
        file=sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
