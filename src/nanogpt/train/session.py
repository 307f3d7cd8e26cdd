"""One training session, either backend: what it trains on, and the loop's steps in order.

`train.loop.train` (PyTorch) and `mlx.train.loop.train` (MLX) each hold the run folder with `open_run`
(which yields the `RunSetup`: configs, folders, data, the checkpoint to resume from), build their backend
`Session` on it (model, optimizer, data sampler; one step, evaluate, save) and hand that to `run_session`,
which drives the same named steps for both, so that the two trainers log, evaluate, checkpoint and stop
alike:

    a new run: evaluate at step 0; then repeat: one step -> log a record -> evaluate -> checkpoint
    (evaluate and checkpoint every eval_interval steps) until max_iters / max_tokens / max_time

    with open_run(model_cfg, train_cfg, data_dir, run, resume=False, force=False) as setup:
        result = run_session(backend_session(setup), peak_flops=1e12)
"""

from __future__ import annotations

import contextlib
import errno
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from nanogpt.config import ModelConfig, TrainConfig, first_difference
from nanogpt.data.shards import BatchSampler, TokenData
from nanogpt.errors import UserError, write_fix
from nanogpt.folders import LOCK, MARKER, RunFolder, RunLock, claim, clear, mark
from nanogpt.train.checkpoint import check_resumable, write_json
from nanogpt.train.losses import LossLog
from nanogpt.train.optim import lr_at, schedule_warning
from nanogpt.train.plot import plot_log, read_log, truncate_log
from nanogpt.train.progress import StepBar
from nanogpt.train.tracking import RunLog, open_run_log

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
    shards: list[np.ndarray],
    batch_loss: BatchLoss,
    *,
    batch_size: int,
    context_length: int,
    iters: int,
    seed: int = EVAL_SEED,
    on_batch: OnBatch | None = None,
) -> float:
    """Mean `batch_loss(x, y)` over `iters` batches from a freshly seeded sampler: the same windows every call,
    the model in eval mode meanwhile (both backends' held-out loss).

    `on_batch(done, iters)` is called before each batch (progress: an evaluation can take minutes)."""
    sampler = BatchSampler(
        shards, batch_size, context_length, seed
    )  # its own stream: training data untouched
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
        """The held-out loss on the fixed val windows (`mean_loss` at the run's batch size and eval_iters)."""
        cfg, context_length = self.cfg, self.model_cfg.context_length
        return mean_loss(
            model,
            self.val_shards,
            batch_loss,
            batch_size=cfg.batch_size,
            context_length=context_length,
            iters=cfg.eval_iters,
            on_batch=on_batch,
        )

    def write_configs(self) -> None:
        """RUN/config.json and RUN/train_config.json (main process; again on resume: the flags may differ)."""
        self.run.mkdir(parents=True, exist_ok=True)
        self.model_cfg.save(RunFolder(self.run).config)
        write_json(RunFolder(self.run).train_config, self.cfg.to_dict())

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
    kind: str = "run",
    rank: int = 0,
    world_size: int = 1,
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
            if not resume and claim(run, kind, force=force) and not run.is_dir():
                clear(run)  # a file at --out, replaced because of --force
            lock = RunLock(run).acquire()
            # look again under the lock: another process may have written the folder since
            if not resume and claim(run, kind, force=force):
                clear(run, keep=(LOCK,))
        resume_from = _check_resume(run, model_cfg) if resume else None
        if main and not resume:
            mark(run, kind)
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


# --- the loop -----------------------------------------------------------------------------------------------


def run_session(
    session: Session,
    *,
    peak_flops: float,
    trackers: Sequence[str] | None = None,
    label: str = "train",
    progress: bool = True,
    loss_log: LossLog | None = None,
) -> TrainResult:
    """Drive `session` to the end of the run under its log and progress bar (see the module docstring).

    `peak_flops` (all processes) is the MFU denominator; `trackers` mirror the log (`train.tracking`);
    `loss_log` is the record a two-part loss keeps (`train.losses.LossLog`): its step is set before each
    update, it is trimmed on resume, and its hard half is logged as `train_ce`.
    """
    setup, counters = session.setup, session.counters
    resume_step = counters.step if setup.resume_from is not None else None
    warning = schedule_warning(setup.cfg)
    if warning and setup.main and resume_step is None:  # once the run is known to start
        print(warning, file=sys.stderr)
    if loss_log is not None:
        loss_log.start_session(main=setup.main, resume_step=resume_step)
    with _session_log(setup, trackers, resume_step) as log:
        bar = StepBar(planned_steps(setup), counters.step, label, progress and setup.main)
        return _run_steps(session, _Loop(bar, log, _Meter(session.flops_per_token, peak_flops), loss_log))


def _session_log(
    setup: RunSetup, trackers: Sequence[str] | None, resume_step: int | None
) -> contextlib.AbstractContextManager[RunLog]:
    """The session's RunLog: log.jsonl plus the trackers on the main process."""
    if not setup.main:
        return contextlib.nullcontext(RunLog(RunFolder(setup.run).log))
    configs = {"model": setup.model_cfg.to_dict(), "train": setup.cfg.to_dict()}
    return open_run_log(RunFolder(setup.run), trackers, configs, resume_step=resume_step)


def planned_steps(setup: RunSetup) -> int:
    """The optimizer steps max_iters or max_tokens allow: the progress bar's length."""
    cfg = setup.cfg
    if not cfg.max_tokens:
        return cfg.max_iters
    return min(cfg.max_iters, math.ceil(cfg.max_tokens / setup.tokens_per_step))


def reached_end(cfg: TrainConfig, step: int, tokens: int) -> bool:
    """Whether max_iters or max_tokens stops the run at `step` (max_time is the step's own answer)."""
    return step >= cfg.max_iters or (cfg.max_tokens is not None and tokens >= cfg.max_tokens)


@dataclass
class _Meter:
    """Throughput: the log lines' (tokens since the last line over the time since it, and MFU) and the whole
    session's (training time only, evaluations and checkpoints excluded)."""

    flops_per_token: float
    peak_flops: float
    t_log: float = 0.0
    tokens_log: int = 0
    train_seconds: float = 0.0
    trained_tokens: int = 0

    def start(self, tokens: int) -> None:
        """The next log line's throughput counts from now and `tokens`."""
        self.t_log, self.tokens_log = time.perf_counter(), tokens

    def record(
        self, step: int, tokens: int, loss: float, lr: float, grad_norm: float | None, elapsed: float
    ) -> dict[str, Any]:
        """A log.jsonl line for `step`; the next line's throughput counts from here."""
        now = time.perf_counter()
        tps = (tokens - self.tokens_log) / max(now - self.t_log, 1e-9)
        self.t_log, self.tokens_log = now, tokens
        return {
            "step": step,
            "loss": loss,
            "lr": lr,
            "tokens": tokens,
            "tokens_per_s": round(tps, 1),
            "mfu": round(self.flops_per_token * tps / self.peak_flops, 5),
            "grad_norm": grad_norm,
            "elapsed": round(elapsed, 3),
        }


@dataclass
class _Loop:
    """What the loop's steps write to: the progress bar, the run log, the meter and a loss's own log."""

    bar: StepBar
    log: RunLog
    meter: _Meter
    loss_log: LossLog | None


def _run_steps(session: Session, loop: _Loop) -> TrainResult:
    """Evaluate where a new run starts, then step until max_iters / max_tokens / max_time; plot the log."""
    setup, counters = session.setup, session.counters
    clock = Clock(before=counters.elapsed)
    if counters.step == 0 and setup.main and counters.first_val_loss is None:  # a new run: where it starts
        val = _evaluate(session, loop.bar)
        loop.log.append({"step": 0, "tokens": 0, "val_loss": val, "val_ppl": perplexity(val)})
    loop.meter.start(counters.step * setup.tokens_per_step)
    done = reached_end(setup.cfg, counters.step, counters.step * setup.tokens_per_step)
    while not done:
        done = _step(session, loop, clock)
    loop.bar.close()
    if setup.main and loop.log.path.is_file():
        plot_log(read_log(loop.log.path), RunFolder(setup.run).plot, title=setup.run.name)
    return _result(session, time.perf_counter() - clock.start, loop.meter)


def _step(session: Session, loop: _Loop, clock: Clock) -> bool:
    """One optimizer step, then its log record, and on eval steps an evaluation and a checkpoint.

    Returns whether the run is over."""
    setup, cfg, step = session.setup, session.setup.cfg, session.counters.step + 1
    lr = lr_at(step, cfg)
    if loop.loss_log is not None:
        loop.loss_log.step = step  # the loss's records carry the step they belong to
    t0 = time.perf_counter()
    result = session.train_step(lr, clock)
    loop.meter.train_seconds += time.perf_counter() - t0
    loop.meter.trained_tokens += setup.tokens_per_step
    done = result.time_up or reached_end(cfg, step, step * setup.tokens_per_step)
    is_eval = step % cfg.eval_interval == 0 or done
    loop.bar.step(result.loss, lr)
    record: dict[str, Any] = {}
    if setup.main and (step % cfg.log_interval == 0 or is_eval):
        record = _record(session, loop, result, lr)
    val = None
    if is_eval and setup.main:
        val = _evaluate(session, loop.bar)
        record.update(val_loss=val, val_ppl=perplexity(val))
    if record:
        loop.log.append(record)
    if is_eval:
        _checkpoint(session, val)
        loop.meter.t_log = time.perf_counter()  # throughput excludes eval and checkpoint time
    return done


def _record(session: Session, loop: _Loop, result: StepResult, lr: float) -> dict[str, Any]:
    """The step's log.jsonl line (without its evaluation)."""
    counters = session.counters
    tokens = counters.step * session.setup.tokens_per_step
    record = loop.meter.record(counters.step, tokens, result.loss, lr, result.grad_norm, counters.elapsed)
    if loop.loss_log is not None:  # a distillation: `loss` mixes the data's CE with the soft part
        ce = loop.loss_log.data_ce(counters.step)
        if ce is not None:
            record["train_ce"] = ce
    return record


def _evaluate(session: Session, bar: StepBar) -> float:
    """The held-out loss now: recorded in the counters and printed; a non-finite one stops the run."""
    counters = session.counters
    val = session.evaluate(bar.evaluating)
    if not math.isfinite(val):
        raise UserError(
            f"val loss is {val} at step {counters.step}; {session.setup.run}/last is left untouched: "
            "lower --learning-rate"
        )
    if counters.first_val_loss is None:
        counters.first_val_loss = val
    counters.last_val_loss = val
    bar.evaluated()
    bar.say(f"step {counters.step}: val loss {val:.4f}, ppl {perplexity(val):.2f}")
    return val


def _checkpoint(session: Session, val: float | None) -> None:
    """best/ if `val` (the main process's evaluation) improved on the best so far, then last/."""
    counters = session.counters
    best = val is not None and (counters.best_val_loss is None or val < counters.best_val_loss)
    if best:
        counters.best_val_loss = val
    session.save(best)


def _result(session: Session, seconds: float, meter: _Meter) -> TrainResult:
    counters = session.counters
    ppl = {
        n: None if v is None else perplexity(v) for n, v in asdict(counters).items() if n.endswith("val_loss")
    }
    return TrainResult(
        steps=counters.step,
        tokens=counters.step * session.setup.tokens_per_step,
        seconds=seconds,
        tokens_per_s=meter.trained_tokens / meter.train_seconds if meter.train_seconds else 0.0,
        first_val_loss=counters.first_val_loss,
        first_val_ppl=ppl["first_val_loss"],
        last_val_loss=counters.last_val_loss,
        last_val_ppl=ppl["last_val_loss"],
        best_val_loss=counters.best_val_loss,
        best_val_ppl=ppl["best_val_loss"],
        run_dir=session.setup.run,
    )
