"""Distillation with the MLX trainer: every teacher kind's loss as an `mlx.train.optim.TwoPartLoss`.

The teacher side is the PyTorch path's own code (the API client and its answer cache, the text a teacher
wrote, the byte alignment of ULD), run before the compiled step; what it gives becomes arrays, and the
loss on them is `nanogpt.mlx.losses` inside the step. A local nanogpt teacher runs in MLX itself; a
Hugging Face teacher runs in PyTorch and hands over its final hidden states. The halves of every
micro-batch go to the same `distill_log.jsonl` as in PyTorch, and a run resumes exactly (each teacher's
answer is a pure function of the batch, the API's cached).

    loss_fn = make_mlx_loss_fn(parse_teacher("runs/big"), TeacherSettings(), train_cfg, model_cfg, data, cache)
    mlx.train.loop.train(model_cfg, train_cfg, data, out, loss_fn=loss_fn, loss_log=loss_fn.log)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import torch

from nanogpt.config import ModelConfig, TrainConfig
from nanogpt.distill.api import TopKDistillLoss
from nanogpt.distill.chunked import Mix
from nanogpt.distill.crossvocab import is_gguf
from nanogpt.distill.local import check_context, load_local_teacher, locate_local_teacher
from nanogpt.distill.losses import DIVERGENCES, check_distill_settings
from nanogpt.distill.sequence import MixedDataLoss
from nanogpt.distill.teachers import DISTILL_LOG, TeacherSettings, TeacherSpec, make_loss_fn
from nanogpt.distill.uld import UldLossFn
from nanogpt.errors import SettingError
from nanogpt.kernels.device import resolve_device
from nanogpt.mlx import losses
from nanogpt.mlx.train.optim import Halves, TwoPartLoss
from nanogpt.train.losses import LoggedLoss, LossLog

MLX_DTYPES = {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}
Arrays = tuple[mx.array, ...]


def to_mx(t: torch.Tensor, dtype: Any = None) -> mx.array:
    """A CPU copy of a torch tensor as an MLX array (on a Mac, MLX moves it to the GPU itself)."""
    a = mx.array(t.detach().cpu().numpy())
    return a if dtype is None else a.astype(dtype)


def _ids(t: torch.Tensor) -> mx.array:
    return to_mx(t, mx.int32)


class _Halves:
    """What every MLX distillation loss shares: its log, and the extras each record carries (skipped answers,
    the aligned share), kept per micro-batch by `inputs` until the step's halves are recorded."""

    constants: Arrays = ()

    def __init__(self, log: LossLog) -> None:
        self.log = log
        self._extras: list[dict[str, Any]] = []

    def record(self, hard: float, soft: float) -> None:
        self.log.record(hard, soft, **(self._extras.pop(0) if self._extras else {}))


def _token_ce(logits: mx.array, y: mx.array) -> mx.array:
    """Mean cross-entropy of logits (B, T, V) against y (B, T), in fp32."""
    return mx.mean(mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, y[..., None], axis=-1)[..., 0])


# --- a local same-vocabulary teacher: dense KD, chunked --------------------------------------------------------


class DenseMlxLoss(_Halves):
    """alpha * CE + (1 - alpha) * T^2 * D(teacher || student) on the full vocabulary, from the final hidden
    states a chunk of positions at a time (`mlx.losses.chunked_parts`): no (B, T, V) logits exist."""

    def __init__(
        self,
        hidden: Callable[[torch.Tensor], mx.array],
        head: mx.array,
        mix: Mix,
        student_cfg: ModelConfig,
        log: LossLog,
    ) -> None:
        super().__init__(log)
        self.hidden, self.constants, self.mix, self.cfg = hidden, (head,), mix, student_cfg

    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> Arrays:
        return (self.hidden(x),)

    def parts(self, model: nn.Module, x: mx.array, y: mx.array, batch: Arrays, const: Arrays) -> Halves:
        h = model.transformer(x)  # (B, T, d)
        m = self.mix
        student = (h, losses.head_weight(model, self.cfg))
        return losses.chunked_parts(student, (batch[0], const[0]), y, m.alpha, m.T, m.divergence, m.beta)


def dense_teacher(path: str, dtype: str, device: str) -> tuple[Callable[[torch.Tensor], mx.array], mx.array]:
    """A local same-vocabulary teacher for MLX: (batch -> final hidden states (B, T, d) fp32, head (V, d)).

    A nanogpt checkpoint runs in MLX (`dtype` casts its weights); a Hugging Face folder runs in PyTorch on
    `device` under autocast, as the PyTorch path runs it, and hands over its hidden states."""
    family, folder = locate_local_teacher(path)
    if family == "hf":
        torch_teacher = load_local_teacher(folder, resolve_device(device), dtype)
        head = to_mx(torch_teacher.head(), mx.float32)

        def hf_hidden(x: torch.Tensor) -> mx.array:
            return to_mx(torch_teacher.hidden(x)[0], mx.float32)

        return hf_hidden, head
    from nanogpt.mlx.train.checkpoint import load_model

    model = load_model(folder)  # eval mode: no dropout
    if dtype != "fp32":
        model.set_dtype(MLX_DTYPES[dtype])
    model.freeze()
    head = losses.head_weight(model, model.config).astype(mx.float32)
    mx.eval(head)

    def mlx_hidden(x: torch.Tensor) -> mx.array:
        check_context(model.config.context_length, x.size(1))
        return model.transformer(_ids(x)).astype(mx.float32)

    return mlx_hidden, head


# --- an API teacher serving our tokenizer: sparse top-k KD ---------------------------------------------------


class TopKMlxLoss(_Halves):
    """alpha * CE + (1 - alpha) * the top-k + rest-bucket KL of `TopKDistillLoss`, its answers (and their
    cache) the PyTorch loss's own."""

    def __init__(self, torch_loss: TopKDistillLoss) -> None:
        super().__init__(torch_loss.log)
        self.teacher = torch_loss

    @property
    def skipped(self) -> int:
        return self.teacher.skipped

    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> Arrays:
        ids, lps, valid, rows = self.teacher.teacher_tensors(x, y)
        self._extras.append({"skipped": self.teacher.client.skipped})
        return _ids(ids), to_mx(lps, mx.float32), to_mx(valid), to_mx(rows)

    def parts(self, model: nn.Module, x: mx.array, y: mx.array, batch: Arrays, const: Arrays) -> Halves:
        logits = model(x).astype(mx.float32)  # (B, T, V), as the plain MLX training loss
        alpha = self.teacher.alpha
        hard = _token_ce(logits, y)
        ids, logprobs, valid, rows = batch
        soft = losses.sparse_kl(logits, ids, logprobs, self.teacher.T, valid, rows)
        return alpha * hard + (1 - alpha) * soft, hard, soft


# --- sequence level: text a teacher wrote, mixed with the data -------------------------------------------------


class MixedMlxLoss(_Halves):
    """alpha * CE on the data batch + (1 - alpha) * CE on an equal batch of the teacher's text (the windows of
    `MixedDataLoss.teacher_batch`), both through the chunked head: no (2B, T, V) logits."""

    def __init__(self, torch_loss: MixedDataLoss, student_cfg: ModelConfig) -> None:
        super().__init__(torch_loss.log)
        self.teacher, self.cfg = torch_loss, student_cfg

    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> Arrays:
        xt, yt = self.teacher.teacher_batch(x)
        T = x.size(1)
        return _ids(xt[:, :T]), _ids(yt[:, :T])

    def parts(self, model: nn.Module, x: mx.array, y: mx.array, batch: Arrays, const: Arrays) -> Halves:
        B, head, alpha = x.shape[0], losses.head_weight(model, self.cfg), self.teacher.alpha
        h = model.transformer(mx.concatenate([x, batch[0]]))  # one forward for both halves: (2B, T, d)
        hard = losses.chunked_ce(h[:B], head, y)
        soft = losses.chunked_ce(h[B:], head, batch[1])
        return alpha * hard + (1 - alpha) * soft, hard, soft


# --- a local teacher of another vocabulary: ULD at aligned positions ------------------------------------------


class UldMlxLoss(_Halves):
    """alpha * CE + (1 - alpha) * mean ULD at the positions `UldLossFn` aligns; the teacher's sorted
    probabilities come as a fixed (B * T, V_t) array, zero rows and a mask where nothing aligned, so the
    compiled step keeps one shape."""

    def __init__(self, torch_loss: UldLossFn) -> None:
        super().__init__(torch_loss.log)
        self.teacher = torch_loss

    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> Arrays:
        positions, rows = self.teacher.teacher_rows(x, y)
        n, T = x.numel(), self.teacher.T
        sorted_p = torch.zeros(n, self.teacher.teacher.vocab_size)
        mask = torch.zeros(n, dtype=torch.bool)
        if positions.numel():
            p = torch.softmax(rows.float().cpu() / T, dim=-1).sort(dim=-1, descending=True).values
            sorted_p[positions], mask[positions] = p, True
        self._extras.append({"aligned": round(positions.numel() / n, 4)})
        return to_mx(sorted_p), to_mx(mask)

    def parts(self, model: nn.Module, x: mx.array, y: mx.array, batch: Arrays, const: Arrays) -> Halves:
        logits = model(x).astype(mx.float32)
        alpha, (sorted_p, mask) = self.teacher.alpha, batch
        hard = _token_ce(logits, y)
        d = losses.uld_distance(logits.reshape(-1, logits.shape[-1]), sorted_p, self.teacher.T)
        soft = mx.sum(mx.where(mask, d, 0.0)) / mx.maximum(mx.sum(mask), 1)
        return alpha * hard + (1 - alpha) * soft, hard, soft


# --- the factory -------------------------------------------------------------------------------------------


def for_mlx(torch_loss: LoggedLoss, student_cfg: ModelConfig) -> TwoPartLoss:
    """The MLX loss of a PyTorch distillation loss whose teacher side it reuses (API, text, ULD teachers)."""
    if isinstance(torch_loss, TopKDistillLoss):
        return TopKMlxLoss(torch_loss)
    if isinstance(torch_loss, MixedDataLoss):
        return MixedMlxLoss(torch_loss, student_cfg)
    if isinstance(torch_loss, UldLossFn):
        return UldMlxLoss(torch_loss)
    raise SettingError("method", f"{type(torch_loss).__name__} has no MLX twin; use the torch backend")


def make_mlx_loss_fn(
    spec: TeacherSpec,
    settings: TeacherSettings,
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    data: str | Path,
    cache_dir: Path,
    down_hint: Callable[[], str] | None = None,
    wording: Callable[[SettingError], str] = str,
) -> TwoPartLoss:
    """`teachers.make_loss_fn` for the MLX trainer: the same teachers, settings, refusals and cache."""
    s = settings
    if spec.source == "local" and s.method in DIVERGENCES and not is_gguf(spec.path):
        check_distill_settings(cfg.distill_alpha, cfg.distill_temperature, s.method, s.beta)
        hidden, head = dense_teacher(spec.path, s.dtype, cfg.device)
        mix = Mix(cfg.distill_alpha, cfg.distill_temperature, s.method, s.beta)
        return DenseMlxLoss(hidden, head, mix, model_cfg, LossLog(cache_dir / DISTILL_LOG))
    torch_loss = make_loss_fn(spec, s, cfg, model_cfg, data, cache_dir, down_hint, wording)
    return for_mlx(torch_loss, model_cfg)
