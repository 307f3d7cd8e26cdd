"""The MLX trainer: the PyTorch trainer's recipe (`nanogpt.train.loop`) with an `mx.compile`d step.

Same schedule (`nanogpt.train.optim.lr_at`), same AdamW decay groups (decay on the Linear weight matrices
only, never on embeddings, LayerNorm or biases), same clipping, accumulation, held-out eval (a fixed-seed
sampler re-created per eval), same data stream (`TokenData` + `BatchSampler`), same `log.jsonl` keys and
the same run folder: `config.json`, `train_config.json`, `log.jsonl`, `loss.png`, `best/` and `last/`
in the shared checkpoint format, so `nanogpt sample/eval/export` read an MLX run as they read a torch run.
The structure is the torch loop's too: `train` holds the run folder, `_open_session` builds a `_Session`
(step, eval, save) and `_loop` drives it; `TrainResult` and `Counters` are the torch side's types.

`last/` adds the optimizer state and `state.json` (`"backend": "mlx"`): see `checkpoint.py`. Resume is
exact because dropout masks need no saved RNG: the MLX generator is re-seeded from (seed, step) before every
step. An MLX `last/` is not resumable by the torch trainer (and vice versa): the optimizer layouts differ.

    result = train(preset("tiny"), TrainConfig(max_iters=200), "data/builtin", "runs/mlx-tiny")
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import torch

from nanogpt.config import ModelConfig, TrainConfig
from nanogpt.data.shards import BatchSampler, TokenData
from nanogpt.errors import UserError
from nanogpt.folders import RunFolder
from nanogpt.mlx.model import NanoGPTLMHeadModel
from nanogpt.mlx.train.checkpoint import (
    load_state_into,
    load_train_state,
    load_weights,
    save_model,
    save_train_state,
    write_model_files,
)
from nanogpt.mlx.train.optim import LossFn, cross_entropy_loss, make_optimizer, make_train_step, to_mx
from nanogpt.train.checkpoint import atomic_dir, resolve_checkpoint, write_json
from nanogpt.train.loop import EVAL_SEED, Counters, TrainResult, perplexity, run_folder, session_log
from nanogpt.train.optim import default_peak_flops, flops_per_token, lr_at, schedule_warning
from nanogpt.train.plot import plot_log, read_log, truncate_log
from nanogpt.train.progress import StepBar
from nanogpt.train.tracking import RunLog

# the counters in state.json, in the order MLX checkpoints have always listed them
_STATE_COUNTERS = ("step", "elapsed", "best_val_loss", "first_val_loss", "last_val_loss")


def estimate_loss(
    model: NanoGPTLMHeadModel,
    shards: list[np.ndarray],
    *,
    batch_size: int,
    context_length: int,
    iters: int,
    seed: int = EVAL_SEED,
    on_batch: Callable[[int, int], None] | None = None,
) -> float:
    """Mean cross-entropy over `iters` batches from a freshly seeded sampler: the same windows every call.

    `on_batch(done, iters)` is called before each batch (progress: an evaluation can take minutes)."""
    sampler = BatchSampler(shards, batch_size, context_length, seed)
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(iters):
        if on_batch is not None:
            on_batch(i, iters)
        x, y = to_mx([sampler.next()])
        total += cross_entropy_loss(model, x[0], y[0]).item()
    model.train(was_training)
    return total / iters


def dropout_seed(seed: int, step: int) -> int:
    """The MLX RNG seed for optimizer step `step` (1-based): dropout depends on (seed, step) only."""
    return (seed * 1_000_003 + step) % 2**63


# --- the run ------------------------------------------------------------------------------------------------


@dataclass
class _Session:
    """What one call to `train` works with; its methods are the loop's three jobs: step, eval, save."""

    model_cfg: ModelConfig
    cfg: TrainConfig
    run: Path
    data_dir: Path
    model: NanoGPTLMHeadModel
    optimizer: optim.MultiOptimizer
    step_fn: Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]  # make_train_step's compiled update
    sampler: BatchSampler
    val_shards: list[np.ndarray]
    counters: Counters

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.model_cfg.context_length * self.cfg.grad_accum_steps

    def train_step(self, lr: float, t_start: float, elapsed0: float) -> tuple[float, float | None, bool]:
        """One optimizer update: (loss, grad norm if clipping is on, whether max_time is reached)."""
        c, step = self.cfg, self.counters.step + 1
        xs, ys = to_mx([self.sampler.next() for _ in range(c.grad_accum_steps)])
        self.optimizer.learning_rate = lr
        mx.random.seed(dropout_seed(c.seed, step))
        loss_a, norm_a = self.step_fn(xs, ys)
        mx.eval(loss_a, norm_a, self.model.parameters(), self.optimizer.state)
        loss, norm = loss_a.item(), norm_a.item()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            # the weights were already updated in memory; nothing is saved, so last/ keeps the last good state
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
            raise UserError(
                f"{what} at step {step}; stopped, {self.run}/last is left untouched: lower --learning-rate "
                "or check the data"
            )
        self.counters.step = step
        self.counters.elapsed = elapsed0 + time.perf_counter() - t_start
        time_up = c.max_time is not None and self.counters.elapsed >= c.max_time
        return loss, norm if c.grad_clip > 0 else None, time_up

    def evaluate(self, on_batch: Callable[[int, int], None] | None = None) -> float:
        """Held-out loss; records it in the counters, refuses a non-finite one."""
        c, step = self.cfg, self.counters.step
        val = estimate_loss(
            self.model,
            self.val_shards,
            batch_size=c.batch_size,
            context_length=self.model_cfg.context_length,
            iters=c.eval_iters,
            on_batch=on_batch,
        )
        if not math.isfinite(val):
            raise UserError(
                f"val loss is {val} at step {step}; {self.run}/last is left untouched: lower --learning-rate"
            )
        if self.counters.first_val_loss is None:
            self.counters.first_val_loss = val
        self.counters.last_val_loss = val
        return val

    def save(self, val: float | None) -> None:
        """best/ (if `val` improved), then last/ with the model, the optimizer state and state.json."""
        k = self.counters
        if val is not None and (k.best_val_loss is None or val < k.best_val_loss):
            k.best_val_loss = val
            save_model(RunFolder(self.run).best, self.model)  # before last/: a kill in between replays here
        info = {
            **{name: getattr(k, name) for name in _STATE_COUNTERS},
            "tokens": k.step * self.tokens_per_step,
            "sampler": self.sampler.state(),
            "train_config": self.cfg.to_dict(),
            "data_dir": str(self.data_dir.resolve()),
        }
        with atomic_dir(RunFolder(self.run).last) as tmp:
            write_model_files(tmp, self.model)
            save_train_state(tmp, self.optimizer, info)


def _restore(
    src: Path,
    run: Path,
    cfg: TrainConfig,
    model: NanoGPTLMHeadModel,
    optimizer: optim.MultiOptimizer,
    sampler: BatchSampler,
) -> Counters:
    """Load `src` (last/ of `run`) into the model, optimizer and sampler; trim the log to its step."""
    load_state_into(model, load_weights(src), src)
    state = load_train_state(src, optimizer)
    counters = Counters(**{f.name: state[f.name] for f in fields(Counters)})
    sampler.load_state(state["sampler"])
    truncate_log(RunFolder(run).log, counters.step)  # lines past the checkpoint will be written again
    print(f"resumed {run} at step {counters.step} of {cfg.max_iters}")
    return counters


def _open_session(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    data_dir: Path,
    run: Path,
    src: Path | None,
    init_from: str | None,
    loss_fn: LossFn,
) -> _Session:
    """Check the data, build model/optimizer/sampler, restore them on resume, write the run's configs."""
    data = TokenData(data_dir)
    train_shards, val_shards = data.split("train"), data.split("val")

    mx.random.seed(cfg.seed)
    model = NanoGPTLMHeadModel(model_cfg)
    if init_from and src is None:
        folder = resolve_checkpoint(init_from)
        load_state_into(model, load_weights(folder), folder)
    optimizer = make_optimizer(model, cfg)
    sampler = BatchSampler(train_shards, cfg.batch_size, model_cfg.context_length, cfg.seed)
    counters = Counters()
    if src is not None:
        counters = _restore(src, run, cfg, model, optimizer, sampler)
    mx.eval(model.parameters(), optimizer.state)
    step_fn = make_train_step(model, optimizer, cfg, loss_fn)  # after any state load

    run.mkdir(parents=True, exist_ok=True)
    model_cfg.save(RunFolder(run).config)
    write_json(RunFolder(run).train_config, cfg.to_dict())
    return _Session(model_cfg, cfg, run, data_dir, model, optimizer, step_fn, sampler, val_shards, counters)


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    init_from: str | None = None,
    progress: bool = True,
    loss_fn: LossFn | None = None,
    peak_flops: float | None = None,
    kind: str = "run",
    trackers: Sequence[str] | None = None,
) -> TrainResult:
    """Train `model_cfg` on `data_dir` into the run folder `out_dir` with MLX (see the module docstring).

    The arguments mean what they mean for `nanogpt.train.loop.train`; `dtype` must be fp32, and `device`
    and `compile` are ignored (MLX runs on its default device and the step is always compiled).
    """
    if train_cfg.dtype != "fp32":
        raise UserError(
            f"the MLX backend trains in fp32, not {train_cfg.dtype}; drop --dtype or use --backend torch"
        )
    if train_cfg.optimizer != "adamw":
        raise UserError(
            f"the MLX backend trains with AdamW, not {train_cfg.optimizer}; drop --optimizer or use --backend torch"
        )
    run = Path(out_dir)
    with run_folder(run, model_cfg, resume=resume, force=force, kind=kind) as src:
        s = _open_session(
            model_cfg, train_cfg, Path(data_dir), run, src, init_from, loss_fn or cross_entropy_loss
        )
        warning = schedule_warning(train_cfg)
        if warning and src is None:  # once the run is known to start (after the data check, as torch)
            print(warning, file=sys.stderr)
        apple_gpu = mx.default_device() == mx.gpu
        peak = peak_flops or default_peak_flops(torch.device("mps" if apple_gpu else "cpu"), "fp32")
        with session_log(run, True, trackers, model_cfg, train_cfg, src, s.counters.step) as log:
            return _loop(s, progress, peak, log)


def _reached_end(cfg: TrainConfig, step: int, tokens: int) -> bool:
    """Whether max_iters or max_tokens stops the run at `step` (max_time is the step's own answer)."""
    return step >= cfg.max_iters or (cfg.max_tokens is not None and tokens >= cfg.max_tokens)


@dataclass
class _Meter:
    """The log lines' throughput and MFU: tokens since the last line over the time since it."""

    flops_per_token: float
    peak: float
    t_log: float
    tokens_log: int

    def record(
        self, step: int, tokens: int, loss: float, lr: float, grad_norm: float | None, elapsed: float
    ) -> dict:
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
            "mfu": round(self.flops_per_token * tps / self.peak, 5),
            "grad_norm": grad_norm,
            "elapsed": round(elapsed, 3),
        }


def _progress_bar(s: _Session, progress: bool) -> StepBar:
    """The steps bar on stderr (disabled without `progress`): the steps max_iters or max_tokens allow."""
    c = s.cfg
    total = min(c.max_iters, math.ceil(c.max_tokens / s.tokens_per_step)) if c.max_tokens else c.max_iters
    return StepBar(total, s.counters.step, "train (mlx)", progress)


def _loop(s: _Session, progress: bool, peak: float, log: RunLog) -> TrainResult:
    """Evaluate, step, log, checkpoint until max_iters / max_tokens / max_time."""
    c, k = s.cfg, s.counters
    bar = _progress_bar(s, progress)

    def evaluate() -> float:
        val = s.evaluate(on_batch=bar.evaluating)
        bar.evaluated()
        bar.say(f"step {k.step}: val loss {val:.4f}, ppl {perplexity(val):.2f}")
        return val

    t_start, elapsed0 = time.perf_counter(), k.elapsed
    train_seconds, trained_tokens = 0.0, 0
    if k.step == 0 and k.first_val_loss is None:  # a new run: where it starts from
        val = evaluate()
        log.append({"step": 0, "tokens": 0, "val_loss": val, "val_ppl": perplexity(val)})
    fpt = flops_per_token(s.model_cfg, s.model.num_params(unique=True))
    meter = _Meter(fpt, peak, time.perf_counter(), k.step * s.tokens_per_step)
    stop = _reached_end(c, k.step, k.step * s.tokens_per_step)
    s.model.train()
    while not stop:
        t0 = time.perf_counter()
        lr = lr_at(k.step + 1, c)
        loss, grad_norm, time_up = s.train_step(lr, t_start, elapsed0)
        train_seconds += time.perf_counter() - t0
        trained_tokens += s.tokens_per_step
        step, tokens = k.step, k.step * s.tokens_per_step
        stop = time_up or _reached_end(c, step, tokens)
        is_eval = step % c.eval_interval == 0 or stop
        bar.step(loss, lr)
        record: dict[str, Any] = {}
        if step % c.log_interval == 0 or is_eval:
            record = meter.record(step, tokens, loss, lr, grad_norm, k.elapsed)
        if is_eval:
            val = evaluate()
            record.update(val_loss=val, val_ppl=perplexity(val))
        if record:
            log.append(record)
        if is_eval:
            s.save(val)
            meter.t_log = time.perf_counter()  # throughput excludes eval and checkpoint time
    bar.close()

    if log.path.is_file():
        plot_log(read_log(log.path), RunFolder(s.run).plot, title=s.run.name)
    return _result(s, time.perf_counter() - t_start, trained_tokens / train_seconds if train_seconds else 0.0)


def _result(s: _Session, seconds: float, tokens_per_s: float) -> TrainResult:
    k = s.counters
    ppl = {n: None if v is None else perplexity(v) for n, v in asdict(k).items() if n.endswith("val_loss")}
    return TrainResult(
        steps=k.step,
        tokens=k.step * s.tokens_per_step,
        seconds=seconds,
        tokens_per_s=tokens_per_s,
        first_val_loss=k.first_val_loss,
        first_val_ppl=ppl["first_val_loss"],
        last_val_loss=k.last_val_loss,
        last_val_ppl=ppl["last_val_loss"],
        best_val_loss=k.best_val_loss,
        best_val_ppl=ppl["best_val_loss"],
        run_dir=s.run,
    )
