"""The training loop's steps, the same for both backends: what `run_session` does with a `Session`.

    a new run: evaluate at step 0; then repeat: one step -> log a record -> evaluate -> checkpoint
    (evaluate and checkpoint every eval_interval steps) until max_iters / max_tokens / max_time

Each step is a function of its own (`_step`, `_record`, `_evaluate`, `_checkpoint`); the backend's
`Session` (`train.loop` for PyTorch, `mlx.train.loop` for MLX) does only what differs: one optimizer
update, the held-out loss, writing the checkpoint.

    result = run_session(session, peak_flops=1e12, trackers=None, label="train", progress=True)
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from nanogpt.config import TrainConfig
from nanogpt.errors import UserError
from nanogpt.folders import RunFolder
from nanogpt.train.losses import LossLog
from nanogpt.train.optim import lr_at, schedule_warning
from nanogpt.train.plot import plot_log, read_log
from nanogpt.train.progress import StepBar
from nanogpt.train.session import Clock, RunSetup, Session, StepResult, TrainResult, perplexity
from nanogpt.train.tracking import RunLog, open_run_log


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
