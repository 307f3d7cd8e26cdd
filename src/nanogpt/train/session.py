"""One training session, either backend: what it trains on, and the contract of the backend's part.

`train.loop.train` (PyTorch) and `mlx.train.loop.train` (MLX) each hold the run folder with `open_run`,
which yields the `RunSetup` (configs, folders, data, the checkpoint to resume from, this process's rank);
on it they build their backend's `Session` (model, optimizer, data sampler: one step, evaluate, save) and
hand that to `train.steps.run_session`, which drives the same steps for both. What the two trainers share
besides: the `Counters` a checkpoint carries, the `TrainResult`, the held-out loss's fixed windows
(`mean_loss`), the answer to a diverged run.

    with open_run(model_cfg, train_cfg, data_dir, run, resume=False, force=False) as setup:
        result = run_session(backend_session(setup), peak_flops=1e12)
"""

from __future__ import annotations

import contextlib
import errno
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from nanogpt.config import ModelConfig, TrainConfig, first_difference
from nanogpt.data.shards import BatchSampler, TokenData
from nanogpt.errors import UserError, write_fix
from nanogpt.folders import LOCK, MARKER, RunFolder, RunLock, claim, clear, mark
from nanogpt.train.adapters import AdapterRecord, file_sha256, spec_of
from nanogpt.train.checkpoint import (
    CONFIG,
    check_resumable,
    first_config_difference,
    lora_base,
    resolve_checkpoint,
    weights_file,
    write_json,
)
from nanogpt.train.lineage import write_lineage
from nanogpt.train.plot import truncate_log

EVAL_SEED = 0  # one fixed stream of val windows for every run and seed: val losses are comparable
OnBatch = Callable[[int, int], None]  # `on_batch(done, total)`: an evaluation's progress


@dataclass
class TrainResult:
    """What a call to `train` achieved (rank 0's view under DDP)."""

    steps: int  # optimizer steps completed, in total
    tokens: int  # training tokens seen by all processes, in total
    seconds: float  # wall time of this call
    tokens_per_s: float  # training throughput of this call, all processes, evals excluded
    first_val_loss: float | None
    first_val_ppl: float | None
    last_val_loss: float | None
    last_val_ppl: float | None
    best_val_loss: float | None
    best_val_ppl: float | None
    run_dir: Path


@dataclass
class Counters:
    """The scalars that `last/state.json` carries from one session of a run to the next."""

    step: int = 0  # optimizer steps completed
    elapsed: float = 0.0  # wall seconds over all sessions (what max_time limits)
    first_val_loss: float | None = None
    last_val_loss: float | None = None
    best_val_loss: float | None = None


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood), the figure every log and report prints beside the loss."""
    return math.exp(min(mean_nll, 700.0))  # exp overflows a float past ~709


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports to the loop (the mean over all processes under DDP)."""

    loss: float
    grad_norm: float | None  # before clipping; None where the backend does not measure it
    time_up: bool  # max_time is reached (on any process)


@dataclass
class Clock:
    """The run's wall time over all its sessions (what max_time limits): earlier sessions', then this one's."""

    before: float  # seconds of the earlier sessions
    start: float = field(default_factory=time.perf_counter)

    def update(self, counters: Counters, max_time: float | None) -> bool:
        """Record the run's elapsed seconds in `counters`; return whether max_time is reached."""
        counters.elapsed = self.before + time.perf_counter() - self.start
        return max_time is not None and counters.elapsed >= max_time


class TrainingMode(Protocol):
    """A network with a training switch (dropout on/off): a torch or an MLX module."""

    @property
    def training(self) -> bool: ...

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...


BatchLoss = Callable[[torch.Tensor, torch.Tensor], float]  # a batch's mean loss: x, y (B, T) -> float


def mean_loss(
    model: TrainingMode,
    sampler: BatchSampler,
    batch_loss: BatchLoss,
    iters: int,
    on_batch: OnBatch | None = None,
) -> float:
    """Mean `batch_loss(x, y)` over the first `iters` batches of `sampler`, the model in eval mode meanwhile
    (both backends' held-out loss; a sampler seeded afresh gives the same windows every call).

    `on_batch(done, iters)` is called before each batch (progress: an evaluation can take minutes)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(iters):
        if on_batch is not None:
            on_batch(i, iters)
        total += batch_loss(*sampler.next())
    model.train(was_training)
    return total / iters


def diverged(what: str, step: int, run: Path) -> UserError:
    """The answer to a non-finite loss or gradient norm (`what`, e.g. "loss is nan") in either backend."""
    return UserError(
        f"{what} at step {step}; stopped, {run}/last is left untouched: lower --learning-rate or check the data"
    )


def out_of_memory(cfg: TrainConfig, where: str, step: int, bf16: bool = True) -> UserError:
    """The answer to running out of memory in either backend: the settings that would fit (half the batch,
    twice the accumulation: the same tokens per step, about half the activations), or bf16 where `bf16`."""
    fits = f"--batch-size {max(1, cfg.batch_size // 2)} --grad-accum-steps {2 * cfg.grad_accum_steps}"
    low = " or --dtype bf16" if bf16 and cfg.dtype == "fp32" else ""
    return UserError(
        f"out of memory at step {step} on {where} with --batch-size {cfg.batch_size} --grad-accum-steps "
        f"{cfg.grad_accum_steps}; try {fits} (same tokens per step){low}"
    )


# --- what a session starts from -------------------------------------------------------------------------


@dataclass(kw_only=True)
class RunSetup:
    """What a session trains on, the same in both backends: the configs, the run and data folders, the
    checkpoint it resumes from, and this process's place (rank 0 of 1 outside torchrun)."""

    model_cfg: ModelConfig
    cfg: TrainConfig
    run: Path
    data_dir: Path
    resume_from: Path | None  # RUN/last (or last.old) on --resume
    train_shards: list[np.ndarray]
    val_shards: list[np.ndarray]
    rank: int = 0
    world_size: int = 1
    init_from: str | None = None  # the checkpoint a fresh run starts from (its lineage carries on here)
    stage: dict[str, Any] | None = None  # what this stage is, for the lineage (train.lineage)

    @property
    def main(self) -> bool:
        """Whether this process logs, evaluates and writes checkpoints (rank 0)."""
        return self.rank == 0

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step, over all processes."""
        cfg = self.cfg
        return cfg.batch_size * self.model_cfg.context_length * cfg.grad_accum_steps * self.world_size

    def train_sampler(self) -> BatchSampler:
        """This rank's stream of training windows (its state is the data position a checkpoint saves)."""
        cfg, model_cfg = self.cfg, self.model_cfg
        return BatchSampler(
            self.train_shards,
            cfg.batch_size,
            model_cfg.context_length,
            cfg.seed,
            self.rank,
            model_cfg.vocab_size,
        )

    def val_loss(self, model: TrainingMode, batch_loss: BatchLoss, on_batch: OnBatch) -> float:
        """The held-out loss on the fixed val windows: eval_iters batches, the same in every evaluation."""
        cfg = self.cfg
        sampler = BatchSampler(self.val_shards, cfg.batch_size, self.model_cfg.context_length, EVAL_SEED)
        return mean_loss(model, sampler, batch_loss, cfg.eval_iters, on_batch)

    def write_configs(self) -> None:
        """RUN/config.json and RUN/train_config.json (main process; again on resume: the flags may differ)."""
        self.run.mkdir(parents=True, exist_ok=True)
        self.model_cfg.save(RunFolder(self.run).config)
        write_json(RunFolder(self.run).train_config, self.cfg.to_dict())
        if self.resume_from is None:  # a resumed run keeps the lineage it started with
            write_lineage(self.run, self.init_from, self.stage or {"name": "train"})

    def state_info(self, counters: dict[str, Any], **backend: Any) -> dict[str, Any]:
        """state.json's contents: the `counters`, the tokens so far, the backend's own keys, the configs."""
        return {
            **counters,
            "tokens": counters["step"] * self.tokens_per_step,
            **backend,
            "train_config": self.cfg.to_dict(),
            "data_dir": str(self.data_dir.resolve()),
        }

    def restored_counters(self, info: dict[str, Any], needs: Sequence[str] = ()) -> Counters:
        """The counters of the checkpoint's state.json `info`; refuses one that lacks them or the keys `needs`."""
        names = [f.name for f in fields(Counters)]
        missing = [key for key in (*names, *needs) if key not in info]
        if missing:
            raise UserError(
                f"training state in {self.resume_from} is incomplete (no {missing[0]!r}); resume from another "
                "checkpoint or start again"
            )
        return Counters(**{name: info[name] for name in names})

    def init_source(self, init_from: str) -> Path:
        """The checkpoint folder a fresh run starts from, refused unless its model config is this run's (dropout
        aside): the weights would load into a different network (another activation, norm or eps) unnoticed."""
        folder = resolve_checkpoint(init_from)
        theirs = ModelConfig.load(folder / CONFIG)
        key = first_config_difference(self.model_cfg, theirs)
        if key is not None:
            raise UserError(
                f"the model config differs from --init-from {init_from}'s at {key!r} "
                f"({getattr(self.model_cfg, key)!r} here, {getattr(theirs, key)!r} there); start from it with "
                "its own config (`nanogpt train --init-from` reads it; in Python, load_config_of(CKPT))"
            )
        return folder

    def lora_record(self, init_from: str | None) -> AdapterRecord:
        """A LoRA run's record of its base (both backends): on resume the checkpoint's (checked to be there
        and unchanged), else `init_from`'s folder and the sha256 of its weights."""
        spec = spec_of(self.cfg)
        if self.resume_from is not None:
            record, _ = lora_base(self.resume_from)
            return AdapterRecord(spec, record.base, record.base_sha256)
        if not init_from:
            raise UserError(
                "--lora-rank needs --init-from BASE: the checkpoint (run or folder) whose frozen weights LoRA adapts"
            )
        base = self.init_source(init_from).resolve()
        return AdapterRecord(spec, base, file_sha256(weights_file(base)))

    def announce_resume(self, step: int) -> None:
        """Once the checkpoint is loaded (main process): log.jsonl's lines past it will be written again."""
        if not self.main:
            return
        log = RunFolder(self.run).log
        if log.is_file():
            truncate_log(log, step)
        print(f"resumed {self.run} at step {step} of {self.cfg.max_iters}")


class Session(Protocol):
    """One backend's model, optimizer and data for one call to `train`: what `run_session` drives."""

    @property
    def setup(self) -> RunSetup: ...

    @property
    def counters(self) -> Counters: ...

    @property
    def flops_per_token(self) -> float:
        """The network's FLOPs per trained token (the MFU numerator)."""
        ...

    def train_step(self, lr: float, clock: Clock) -> StepResult:
        """One optimizer update at `lr`; advances `counters.step` and, through `clock`, `counters.elapsed`."""
        ...

    def evaluate(self, on_batch: OnBatch) -> float:
        """The mean held-out loss on the fixed val windows (main process only)."""
        ...

    def save(self, best: bool) -> None:
        """`best/` (if `best`), then `last/` with the full training state; every process calls it."""
        ...


_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


@contextlib.contextmanager
def open_run(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    data_dir: Path,
    run: Path,
    *,
    resume: bool,
    force: bool,
    purpose: str = "run",
    rank: int = 0,
    world_size: int = 1,
    init_from: str | None = None,
    stage: dict[str, Any] | None = None,
) -> Iterator[RunSetup]:
    """Hold the run folder for one training session (both backends) and check the data: the `RunSetup`.

    The main process refuses a folder it may not replace (nanogpt.folders.claim), locks it, clears a
    replaced one and marks it; on exit it unlocks, removes a folder it created but never wrote to, and turns
    Ctrl-C and a full or read-only disk into a line that says how to continue.
    """
    main = rank == 0
    created, lock = not run.exists(), None
    try:
        if main:
            if not resume and claim(run, purpose, force=force) and not run.is_dir():
                clear(run)  # a file at --out, replaced because of --force
            lock = RunLock(run).acquire()
            # look again under the lock: another process may have written the folder since
            if not resume and claim(run, purpose, force=force):
                clear(run, keep=(LOCK,))
        resume_from = _check_resume(run, model_cfg) if resume else None
        if main and not resume:
            mark(run, purpose)
        train_shards, val_shards = _open_data(data_dir, model_cfg)
        yield RunSetup(
            model_cfg=model_cfg,
            cfg=cfg,
            run=run,
            data_dir=data_dir,
            resume_from=resume_from,
            train_shards=train_shards,
            val_shards=val_shards,
            rank=rank,
            world_size=world_size,
            init_from=init_from,
            stage=stage,
        )
    except KeyboardInterrupt:
        raise KeyboardInterrupt(resume_hint(run)) from None
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        raise UserError(
            f"could not write to {run} ({e.strerror}); {write_fix(e.errno)}, then {resume_hint(run)}"
        ) from None
    finally:
        if lock is not None:
            lock.release()
            if created and run.is_dir() and {p.name for p in run.iterdir()} <= {LOCK, MARKER}:
                clear(run)  # stopped before writing anything: leave nothing behind
                run.rmdir()


def _check_resume(run: Path, model_cfg: ModelConfig) -> Path:
    """Validate a run folder to resume; return the checkpoint folder to continue from."""
    folder = RunFolder(run)
    if not folder.config.is_file():
        check_resumable(run)  # says there is nothing to resume
    saved = ModelConfig.load(folder.config).to_dict()
    key = first_difference(saved, model_cfg.to_dict())
    if key is not None:
        raise UserError(
            f"--resume: model config differs from {run}/config.json at {key!r} (run has {saved.get(key)!r}, "
            f"requested {model_cfg.to_dict().get(key)!r}); resume with the run's config or start a new --out"
        )
    check_resumable(run)
    return folder.resume_point


def resume_hint(run: Path) -> str:
    """What to tell a user whose run stopped: resume from its checkpoint, or start it again."""
    if RunFolder(run).has_checkpoint():
        return f"{run}/last holds the last checkpoint; continue with the same command plus --resume"
    return "no checkpoint was written yet; run the same command again to start over"


def _open_data(data_dir: Path, model_cfg: ModelConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The data folder's train and val shards, checked against the model's vocabulary."""
    data = TokenData(data_dir)
    if model_cfg.vocab_size < data.meta["vocab_size"]:
        raise UserError(
            f"vocab_size={model_cfg.vocab_size} is smaller than the data's {data.meta['vocab_size']}"
        )
    return list(data.split("train")), list(data.split("val"))
