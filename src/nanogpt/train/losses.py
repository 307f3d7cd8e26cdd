"""The loss hook of the training loop, written down as types: `LossFn` and the log a two-part loss keeps.

Both trainers call `loss_fn(model, x, y) -> scalar loss` on every micro-batch: the default is the plain
cross-entropy (`train.optim.cross_entropy_loss`, its MLX twin in `mlx.train.optim`), a distillation passes
its own. `LossFn` is one protocol for both backends, over the backend's module and array types:
`LossFn[torch.nn.Module, torch.Tensor]` for PyTorch, `LossFn[mlx.nn.Module, mx.array]` for MLX.

A distillation loss mixes two halves, `alpha * hard + (1 - alpha) * soft`: the cross-entropy on the data
batch and what the teacher adds. The trainer logs only the mixture as `loss`, so such a loss keeps a
`LossLog` of its halves (a `LoggedLoss`), and the trainer is handed that log explicitly
(`train(..., loss_fn=f, loss_log=f.log)`): it sets the step each record carries, trims the file on resume
exactly like `log.jsonl`, and logs the step's mean hard half as `train_ce`.

    log = LossLog(Path("runs/kd.teacher/distill_log.jsonl"))
    log.record(hard=parts.hard, soft=parts.soft)  # inside the loss's __call__
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from nanogpt.train.plot import append_log, truncate_log

ModelT = TypeVar("ModelT", contravariant=True)  # the backend's module type: only ever passed in
ArrayT = TypeVar("ArrayT")  # the backend's array type: the batch in, the scalar loss out


class LossFn(Protocol[ModelT, ArrayT]):
    """`loss_fn(model, x, y) -> loss`: a scalar to minimise for inputs x (B, T) and next tokens y (B, T)."""

    def __call__(self, model: ModelT, x: ArrayT, y: ArrayT, /) -> ArrayT: ...


class LossLog:
    """The two halves of a mixed loss, one record per call: in `history`, and appended to a JSONL file.

    A record is `{"step", "hard", "soft", ...extra}`. The trainer owns the bookkeeping: `start_session`
    says whether this process writes the file (only the main one does) and trims a resumed run's file to
    its checkpoint, `step` is set before each optimizer step.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.history: list[dict[str, Any]] = []
        self.step = 0  # the optimizer step being computed (set by the trainer)
        self.writes = True  # whether this process appends to `path` (the trainer's main process only)

    def start_session(self, *, main: bool, resume_step: int | None) -> None:
        """Called by the trainer before its first step: records past a resumed checkpoint are written again."""
        self.writes = main
        if main and resume_step is not None and self.path is not None and self.path.is_file():
            truncate_log(self.path, resume_step)

    def record(self, hard: torch.Tensor | float, soft: torch.Tensor | float, **extra: Any) -> None:
        """Keep one call's halves (scalars; `soft` as the loss weighs it, with any T^2 factor)."""
        rec = {"step": self.step, "hard": _scalar(hard), "soft": _scalar(soft), **extra}
        self.history.append(rec)
        if self.writes and self.path is not None:
            append_log(self.path, rec)

    def data_ce(self, step: int) -> float | None:
        """The hard half at `step`: the mean over this process's micro-batches; None if none was recorded."""
        hard = []
        for rec in reversed(self.history):
            if rec["step"] != step:
                break
            hard.append(rec["hard"])
        return sum(hard) / len(hard) if hard else None


def _scalar(value: torch.Tensor | float) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


class LoggedLoss(LossFn[nn.Module, torch.Tensor], Protocol):
    """A PyTorch loss that keeps a `LossLog` of its halves (every distillation loss): pass `log` to `train`."""

    log: LossLog
