"""Distillation teachers: the teacher SPEC and, for each source of teacher, the trainer's `loss_fn`.

A SPEC picks one of three paths (see `nanogpt.distill.losses` for the losses):

- a local folder (a nanogpt run/checkpoint, or a Hugging Face causal LM with GPT-2's 50,257-token
  vocabulary): full-vocabulary soft targets on the fly, under no_grad, teacher in eval mode
  (`nanogpt.distill.local`). A Hugging Face folder or `.gguf` file of *any* vocabulary takes
  method "sequence" (it writes text locally, handled like a chat teacher's) or "uld" (the
  Universal Logit Distillation loss at aligned positions): `nanogpt.distill.crossvocab`, `.uld`;
- `completions:MODEL@BASE_URL`: an OpenAI-compatible /v1/completions server for a model with *our*
  tokenizer that returns prompt-token top-k logprobs (`nanogpt serve`, vLLM, llama.cpp): sparse top-k KD,
  see `nanogpt.distill.api`;
- `chat:MODEL@BASE_URL`: any chat API with any tokenizer (the card's GPT-OSS-20B on Groq): no logprobs
  exist, so the teacher writes continuations of corpus prompts and the student learns them with the
  hard loss (sequence-level KD), mixed `alpha` : `1 - alpha` with the original data.

Every path goes through `train.train(..., init_from=student, loss_fn=...)`, so checkpoints, exact
resume, eval, logs and plots are the trainer's.

    loss_fn = make_loss_fn(parse_teacher("runs/big"), TeacherSettings(), train_cfg, model_cfg, data, cache_dir)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nanogpt.config import ModelConfig, TrainConfig
from nanogpt.distill.client import ApiConfig, check_base_url
from nanogpt.distill.crossvocab import is_gguf
from nanogpt.distill.local import DistillLossFn, load_local_teacher
from nanogpt.distill.losses import CROSS_VOCAB_METHODS, DIVERGENCES, check_distill_settings
from nanogpt.distill.sequence import MixedDataLoss, build_sequence_data
from nanogpt.errors import SettingError, UserError
from nanogpt.kernels.device import resolve_device
from nanogpt.train.losses import LoggedLoss, LossLog

DISTILL_LOG = "distill_log.jsonl"  # in the teacher folder: the hard/soft halves of every step


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed teacher SPEC: its source "local" (path), "completions" or "chat" (model @ base URL)."""

    source: str
    path: str = ""
    model: str = ""
    base_url: str = ""


def parse_teacher(spec: str) -> TeacherSpec:
    for source in ("completions", "chat"):
        if spec.startswith(source + ":"):
            # MODEL ends at the first "@scheme://" (a model name may hold "@", a URL's user:password part too)
            m = re.fullmatch(r"(.+?)@([A-Za-z][A-Za-z0-9+.-]*://.*)", spec[len(source) + 1 :], re.S)
            if m is None:
                raise SettingError(
                    "teacher",
                    f"`teacher` {spec!r}: write {source}:MODEL@BASE_URL, e.g. {source}:gpt2@http://127.0.0.1:8000/v1",
                )
            return TeacherSpec(source, model=m[1], base_url=check_base_url(m[2]))
    if spec.startswith(("http://", "https://")):
        raise SettingError(
            "teacher", f"`teacher` {spec!r} is a URL; write completions:MODEL@URL or chat:MODEL@URL"
        )
    return TeacherSpec("local", path=spec)


@dataclass(frozen=True)
class TeacherSettings:
    """How to use a teacher: the divergence (local), top-k (completions), the chat data set, the API client."""

    method: str = "forward_kl"  # local teacher: forward_kl | reverse_kl | jsd | uld | sequence
    beta: float = 0.5  # jsd mixture weight
    dtype: str = "fp32"  # local teacher precision (autocast)
    top_k: int = 20  # completions: top-k logprobs asked per position
    prompts: int = 256  # chat / sequence: prompts drawn from the training split
    prompt_tokens: int = 64  # chat / sequence: tokens per prompt
    reply_tokens: int = 256  # chat / sequence: max_tokens per teacher reply
    teacher_batch: int = 8  # local sequence-level teacher: prompts per generate call
    skip_bad: bool = False  # count and skip bad answers instead of stopping
    api_key_env: str | None = None  # env var holding the key (None: OPENAI_API_KEY, if set)
    concurrency: int = 4
    timeout: float = 60.0
    retries: int = 5


def api_config(spec: TeacherSpec, settings: TeacherSettings) -> ApiConfig:
    """The client settings of an API teacher (range-checked by ApiConfig)."""
    return ApiConfig(
        base_url=spec.base_url,
        model=spec.model,
        api_key_env=settings.api_key_env or "OPENAI_API_KEY",
        concurrency=settings.concurrency,
        timeout=settings.timeout,
        retries=settings.retries,
        key_required=settings.api_key_env is not None,
    )


def make_loss_fn(
    spec: TeacherSpec,
    settings: TeacherSettings,
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    data: str | Path,
    cache_dir: Path,
    down_hint: Callable[[], str] | None = None,
    wording: Callable[[SettingError], str] = str,
) -> LoggedLoss:
    """The trainer's loss_fn for this teacher; a chat teacher writes its data set (from `data`) first.

    `cache_dir` keeps the API answers, the chat data and the hard/soft log (the loss's `log`, which the
    trainer gets as `loss_log`); `down_hint()` ends the message of an API teacher that stays down (what to
    rerun); `wording(e)` prints a skipped answer's refusal (a command names its flags there). Refusals are
    `SettingError`s marking settings by their `TeacherSettings` name (`method`, `top_k`...).
    """
    alpha, T, s = cfg.distill_alpha, cfg.distill_temperature, settings
    check_distill_settings(alpha, T, s.method, s.beta, methods=(*DIVERGENCES, *CROSS_VOCAB_METHODS))
    log = LossLog(cache_dir / DISTILL_LOG)
    if spec.source == "local":
        device = resolve_device(cfg.device)
        if s.method == "uld":
            from nanogpt.distill.crossvocab import load_text_teacher
            from nanogpt.distill.uld import UldLossFn

            return UldLossFn(load_text_teacher(spec.path, device, s.dtype), alpha, T, log)
        if s.method == "sequence":
            return local_sequence_loss(spec, s, cfg, model_cfg, data, cache_dir, log)
        if is_gguf(spec.path):
            raise SettingError(
                "method",
                f"teacher {spec.path} is a .gguf file, whose vocabulary is its own; pass `method` sequence (it "
                "writes text) or `method` uld (logits across vocabularies)",
            )
        teacher = load_local_teacher(spec.path, device, s.dtype)
        return DistillLossFn(teacher, alpha, T, s.method, s.beta, log)
    if s.method == "uld" or (s.method == "sequence" and spec.source == "completions"):
        raise SettingError(
            "method",
            f"`method` {s.method} does not apply to a {spec.source}: teacher; use `method` uld or sequence with a "
            "local teacher, chat:MODEL@URL for text from an API",
        )
    from nanogpt.distill import api as teachers  # the HTTP client and its cache: API teachers only

    client = teachers.ApiClient(
        api_config(spec, s), teachers.AnswerCache(cache_dir / "cache.sqlite"), wording=wording
    )
    if down_hint is not None:
        client.down_hint = down_hint
    if spec.source == "completions":
        return teachers.TopKDistillLoss(client, s.top_k, alpha, T, skip_bad=s.skip_bad, log=log)
    chat_data = teachers.build_chat_data(
        client,
        data,
        cache_dir / "chat_data",
        n_prompts=s.prompts,
        prompt_tokens=s.prompt_tokens,
        reply_tokens=s.reply_tokens,
        seed=cfg.seed,
        skip_bad=s.skip_bad,
    )
    return MixedDataLoss(chat_data, model_cfg.context_length, alpha, log=log)


def local_sequence_loss(
    spec: TeacherSpec,
    s: TeacherSettings,
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    data: str | Path,
    cache_dir: Path,
    log: LossLog,
) -> LoggedLoss:
    """Method "sequence" with a local teacher: its replies (cached like a chat teacher's) mixed with the data."""
    from nanogpt.distill.client import AnswerCache
    from nanogpt.distill.crossvocab import LocalReplies, load_text_teacher, teacher_identity

    if not Path(spec.path).exists():
        raise UserError(f"teacher {spec.path} not found; give a Hugging Face model folder or a .gguf file")
    device = resolve_device(cfg.device)
    replies = LocalReplies(
        lambda: load_text_teacher(spec.path, device, s.dtype),
        AnswerCache(cache_dir / "cache.sqlite"),
        teacher_identity(spec.path),
        s.teacher_batch,
    )
    path = Path(spec.path)
    chat_data = build_sequence_data(
        data,
        cache_dir / "chat_data",
        replies,
        model=path.stem if is_gguf(path) else path.name,
        source={"kind": "local-teacher", "path": str(path.resolve())},
        n_prompts=s.prompts,
        prompt_tokens=s.prompt_tokens,
        reply_tokens=s.reply_tokens,
        seed=cfg.seed,
    )
    return MixedDataLoss(chat_data, model_cfg.context_length, alpha=cfg.distill_alpha, log=log)
