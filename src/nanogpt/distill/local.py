"""Local distillation teachers: a frozen same-vocabulary model (a nanogpt checkpoint or a Hugging Face causal
LM with GPT-2's 50,257 tokens) giving full-vocabulary soft targets on the fly, and its dense loss.

    loss_fn = DistillLossFn(load_local_teacher("runs/big", "cpu"), alpha=0.5, T=2.0)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from nanogpt.config import ModelConfig
from nanogpt.data.tokenizer import VOCAB_SIZE
from nanogpt.distill.chunked import Mix, chunked_distill_parts
from nanogpt.distill.losses import TEACHER_SPECS, check_distill_settings
from nanogpt.errors import SettingError, UserError, missing_extra
from nanogpt.kernels.device import autocast, torch_dtype
from nanogpt.train.checkpoint import unwrap
from nanogpt.train.losses import LossLog


def check_context(teacher_context: int, window: int) -> None:
    """A teacher must see the student's whole window."""
    if window > teacher_context:
        raise UserError(
            f"the teacher's context is {teacher_context} tokens, the student's windows are {window}; "
            "use a teacher with at least the student's context"
        )


class LocalTeacher:
    """A frozen same-vocabulary model: `logits(x)` (B, T) -> (B, T, 50257) float32, no grad."""

    module: Any  # a NanoGPTLMHeadModel or a transformers causal LM (its generate/base_model are untyped)

    def __init__(self, module: nn.Module, family: str, context_length: int, dtype: str = "fp32") -> None:
        # family: "nanogpt" (a run of ours) or "hf" (a Hugging Face causal LM): how to reach its logits
        self.module, self.family, self.context_length, self.dtype = (
            module.eval(),
            family,
            context_length,
            dtype,
        )
        for p in self.module.parameters():
            p.requires_grad_(False)

    def _check_context(self, x: torch.Tensor) -> None:
        check_context(self.context_length, x.size(1))

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self._check_context(x)
        device = next(self.module.parameters()).device
        with autocast(device, self.dtype):
            out = self.module(x.to(device))
        logits = out if self.family == "nanogpt" else out.logits
        return logits[..., :VOCAB_SIZE].float()

    @torch.no_grad()
    def hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The final hidden states (B, T, d) and the head (50257, d): the logits without forming them."""
        self._check_context(x)
        device = next(self.module.parameters()).device
        with autocast(device, self.dtype):
            if self.family == "nanogpt":
                h = self.module(x.to(device), hidden=True)
            else:  # a Hugging Face causal LM: its base model's last hidden state (after the final norm)
                h = self.module.base_model(x.to(device)).last_hidden_state
        return h.to(x.device), self.head().to(x.device)

    def head(self) -> torch.Tensor:
        """The output head's weight (50257, d), on the teacher's device: its logits are hidden @ head^T."""
        head = self.module.get_output_embeddings() if self.family != "nanogpt" else self.module.lm_head
        if getattr(head, "bias", None) is not None:
            raise UserError(
                "the teacher's output head has a bias; chunked distillation supports bias-free heads"
            )
        return head.weight[:VOCAB_SIZE]


def _gpt2_vocab_ok(folder: Path) -> bool | None:
    """Whether a HF folder's tokenizer vocabulary is GPT-2's (None when it ships no vocab.json)."""
    vocab = folder / "vocab.json"
    if not vocab.is_file():
        return None
    from nanogpt.data.tokenizer import bpe_files

    return json.loads(vocab.read_text()) == json.loads(bpe_files()[0].read_text())


def locate_local_teacher(path: str | Path) -> tuple[str, Path]:
    """A local same-vocabulary teacher's family and folder: ("nanogpt", its checkpoint folder) or ("hf", the
    Hugging Face folder), its vocabulary checked against GPT-2's (a one-line refusal naming `method` else)."""
    from nanogpt.train.checkpoint import CONFIG, resolve_checkpoint

    p = Path(path)
    if not p.exists():
        raise SettingError(
            "teacher", f"teacher {p} not found; the teacher SPEC is a local folder or one of: {TEACHER_SPECS}"
        )
    cfg_file = p / CONFIG
    if not (cfg_file.is_file() and "model_type" in json.loads(cfg_file.read_text())):
        folder = resolve_checkpoint(p)
        cfg = ModelConfig.load(folder / CONFIG)
        if cfg.vocab_size != VOCAB_SIZE:
            raise SettingError(
                "teacher",
                f"teacher {p} has vocab_size {cfg.vocab_size}, not GPT-2's {VOCAB_SIZE}; use "
                + TEACHER_SPECS,
            )
        return "nanogpt", folder
    hf_cfg = json.loads(cfg_file.read_text())
    vocab = hf_cfg.get("vocab_size")
    if vocab != VOCAB_SIZE or _gpt2_vocab_ok(p) is False:
        raise SettingError(
            "method",
            f"teacher {p} uses another tokenizer (vocab {vocab}, model_type {hf_cfg.get('model_type')!r}); "
            "its distributions cannot be matched token by token: pass `method` sequence (it writes text) or "
            "`method` uld (logits across vocabularies), or serve it as chat:MODEL@URL",
        )
    return "hf", p


def load_local_teacher(
    path: str | Path, device: str | torch.device = "cpu", dtype: str = "fp32"
) -> LocalTeacher:
    """A nanogpt run/checkpoint folder or a Hugging Face causal-LM folder (offline), checked for our vocab."""
    from nanogpt.train.checkpoint import CONFIG, load_model

    torch_dtype(dtype)
    family, folder = locate_local_teacher(path)
    if family == "nanogpt":
        cfg = ModelConfig.load(folder / CONFIG)
        return LocalTeacher(load_model(folder, device=device), "nanogpt", cfg.context_length, dtype)
    hf_cfg = json.loads((folder / CONFIG).read_text())
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise missing_extra("a Hugging Face teacher needs transformers", "hf") from None
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the Hugging Face teacher {folder}: {str(e).splitlines()[0]}") from None
    context_length = int(hf_cfg.get("n_positions") or hf_cfg.get("max_position_embeddings") or 10**9)
    return LocalTeacher(cast(Any, hf_model).to(device), "hf", context_length, dtype)


class DistillLossFn:
    """The trainer's `loss_fn` for a local teacher: dense KD on the full vocabulary.

    Keeps the hard/soft halves of every call in its `log` (a `train.losses.LossLog`: pass it to `train` as
    `loss_log`) so that what the soft loss does is measurable, not only the combined loss the trainer logs.
    """

    def __init__(
        self,
        teacher: LocalTeacher,
        alpha: float = 0.5,
        T: float = 1.0,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        log: LossLog | None = None,
    ) -> None:
        check_distill_settings(alpha, T, divergence, beta)
        self.teacher, self.mix = teacher, Mix(alpha, T, divergence, beta)
        self.log = log if log is not None else LossLog()

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # both heads applied a chunk of positions at a time: no (B, T, V) logits of either model exist
        h = model(x, hidden=True)  # (B, T, d), through DDP's forward when wrapped
        t_h, t_head = self.teacher.hidden(x)  # (B, T, d_t), (V, d_t), no grad
        head = unwrap(model).lm_head.weight
        parts = chunked_distill_parts((h, head), (t_h, t_head), y, self.mix)
        self.log.record(parts.hard, parts.soft)
        return parts.total
