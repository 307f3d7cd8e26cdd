"""The MLX trainer: the PyTorch trainer's recipe (`nanogpt.train.loop`) with an `mx.compile`d step.

Same schedule (`nanogpt.train.optim.lr_at`), same AdamW decay groups (decay on the Linear weight matrices
only, never on embeddings, LayerNorm or biases), same clipping, accumulation, held-out eval (a fixed-seed
sampler re-created per eval), same data stream (`TokenData` + `BatchSampler`), same `log.jsonl` keys and
the same run folder: `config.json`, `train_config.json`, `log.jsonl`, `loss.png`, `best/` and `last/`
in the shared checkpoint format, so `nanogpt sample/eval/export` read an MLX run as they read a torch run.
The structure is the torch loop's too: `train` holds the run folder (`train.session.open_run`),
`_open_session` builds a `_Session` (one step, evaluate, save; `_restore` on resume) and
`train.steps.run_session` drives it, the same driver as the torch trainer's, with the same `TrainResult`
and `Counters`.

`last/` adds the optimizer state and `state.json` (`"backend": "mlx"`): see `checkpoint.py`. Resume is
exact because dropout masks need no saved RNG: the MLX generator is re-seeded from (seed, step) before every
step. An MLX `last/` is not resumable by the torch trainer (and vice versa): the optimizer layouts differ.

    result = train(preset("tiny"), TrainConfig(max_iters=200), "data/builtin", "runs/mlx-tiny")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import torch

from nanogpt.config import ModelConfig, TrainConfig
from nanogpt.data.shards import BatchSampler
from nanogpt.errors import UserError
from nanogpt.folders import RunFolder
from nanogpt.mlx.lora import apply_lora, load_adapter_state
from nanogpt.mlx.model import NanoGPTLMHeadModel
from nanogpt.mlx.train.checkpoint import (
    load_adapters,
    load_state_into,
    load_train_state,
    load_weights,
    save_model,
    save_train_state,
    write_model_files,
)
from nanogpt.mlx.train.optim import (
    OnePartLoss,
    PartsStep,
    TwoPartLoss,
    cross_entropy_loss,
    make_optimizer,
    make_parts_step,
    to_mx,
)
from nanogpt.train.adapters import AdapterRecord
from nanogpt.train.checkpoint import atomic_dir
from nanogpt.train.losses import LossFn, LossLog
from nanogpt.train.optim import default_peak_flops, flops_per_token
from nanogpt.train.session import (
    EVAL_SEED,
    Clock,
    Counters,
    OnBatch,
    RunSetup,
    StepResult,
    TrainResult,
    diverged,
    mean_loss,
    open_run,
    out_of_memory,
)
from nanogpt.train.steps import run_session

MlxLoss = LossFn[nn.Module, mx.array]
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
    on_batch: OnBatch | None = None,
) -> float:
    """Mean cross-entropy over `iters` batches from a freshly seeded sampler: the same windows every call
    (`train.session.mean_loss`, as the torch trainer's).

    `on_batch(done, iters)` is called before each batch (progress: an evaluation can take minutes)."""
    sampler = BatchSampler(shards, batch_size, context_length, seed)  # its own stream: training's untouched
    return mean_loss(model, sampler, partial(_batch_loss, model), iters, on_batch)


def _batch_loss(model: NanoGPTLMHeadModel, x: torch.Tensor, y: torch.Tensor) -> float:
    xs, ys = to_mx([(x, y)])
    return _scalar(cross_entropy_loss(model, xs[0], ys[0]))


def _scalar(value: mx.array) -> float:
    return cast(float, value.item())  # a float32 scalar (MLX's stubs say int | float | complex)


def dropout_seed(seed: int, step: int) -> int:
    """The MLX RNG seed for optimizer step `step` (1-based): dropout depends on (seed, step) only."""
    return (seed * 1_000_003 + step) % 2**63


# --- the session --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _Session:
    """What one call to `train` works with (a `train.session.Session`): one step, evaluate, save."""

    setup: RunSetup
    model: NanoGPTLMHeadModel
    optimizer: optim.MultiOptimizer
    step_fn: PartsStep  # make_parts_step's compiled update
    sampler: BatchSampler
    counters: Counters
    loss: TwoPartLoss  # a distillation's (its teacher's inputs, then its halves logged) or a OnePartLoss
    lora: AdapterRecord | None = None  # a LoRA run: checkpoints hold only the adapters, and this record

    @property
    def flops_per_token(self) -> float:
        return flops_per_token(self.setup.model_cfg, self.model.num_params(unique=True))

    def train_step(self, lr: float, clock: Clock) -> StepResult:
        """One optimizer update: the loss, the grad norm if clipping is on, whether max_time is reached."""
        cfg, step = self.setup.cfg, self.counters.step + 1
        batches = [self.sampler.next() for _ in range(cfg.grad_accum_steps)]
        batch, const = self._teacher_inputs(batches)
        xs, ys = to_mx(batches)
        self.optimizer.learning_rate = lr
        mx.random.seed(dropout_seed(cfg.seed, step))
        try:
            loss_a, norm_a, halves = self.step_fn(xs, ys, batch, const)
            mx.eval(loss_a, norm_a, halves, self.model.parameters(), self.optimizer.state)
        except (RuntimeError, MemoryError) as e:
            if isinstance(e, MemoryError) or "memory" in str(e).lower() or "malloc" in str(e):
                raise out_of_memory(cfg, f"MLX's {mx.default_device()}", step, bf16=False) from None
            raise
        loss, norm = _scalar(loss_a), _scalar(norm_a)
        for hard, soft in cast(list[list[float]], halves.tolist()):
            self.loss.record(hard, soft)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            # the weights were already updated in memory; nothing is saved, so last/ keeps the last good state
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
            raise diverged(what, step, self.setup.run)
        self.counters.step = step
        time_up = clock.update(self.counters, cfg.max_time)
        return StepResult(loss, norm if cfg.grad_clip > 0 else None, time_up)

    def _teacher_inputs(
        self, batches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[tuple[mx.array, ...], tuple[mx.array, ...]]:
        """What a distillation's teacher gives for each micro-batch, stacked (A, ...), and its constants."""
        per_batch = [self.loss.inputs(x, y) for x, y in batches]
        stacked = tuple(mx.stack(list(arrays)) for arrays in zip(*per_batch, strict=True))
        mx.eval(stacked)  # the teacher's work is done here, before the step: its activations are freed
        return stacked, self.loss.constants

    def evaluate(self, on_batch: OnBatch) -> float:
        """The held-out loss on the fixed val windows."""
        return self.setup.val_loss(self.model, partial(_batch_loss, self.model), on_batch)

    def save(self, best: bool) -> None:
        """best/ (if `best`), then last/ with the model, the optimizer state and state.json."""
        folder = RunFolder(self.setup.run)
        if best:
            save_model(folder.best, self.model, self.lora)  # before last/: a kill in between replays here
        counters = {name: getattr(self.counters, name) for name in _STATE_COUNTERS}
        info = self.setup.state_info(counters, sampler=self.sampler.state())
        with atomic_dir(folder.last) as tmp:
            write_model_files(tmp, self.model, self.lora)
            save_train_state(tmp, self.optimizer, info)


def _open_session(setup: RunSetup, *, init_from: str | None, loss_fn: MlxLoss | TwoPartLoss) -> _Session:
    """Build model, optimizer and sampler on `setup`, restore them on resume, write the run's configs."""
    mx.random.seed(setup.cfg.seed)
    model = NanoGPTLMHeadModel(setup.model_cfg)
    lora = None
    if setup.cfg.lora_rank:
        lora = _with_lora(model, setup, init_from)
    elif init_from and setup.resume_from is None:
        folder = setup.init_source(init_from)
        load_state_into(model, load_weights(folder), folder)
    optimizer = make_optimizer(model, setup.cfg)
    sampler = setup.train_sampler()
    counters = Counters()
    if setup.resume_from is not None:
        counters = _restore(setup, setup.resume_from, model, optimizer, sampler, lora is None)
    mx.eval(model.parameters(), optimizer.state)
    model.train()  # dropout on; an evaluation puts back the mode it found
    setup.write_configs()
    loss = loss_fn if isinstance(loss_fn, TwoPartLoss) else OnePartLoss(loss_fn)
    step_fn = make_parts_step(model, optimizer, setup.cfg, loss.parts)  # after any state load
    return _Session(
        setup=setup,
        model=model,
        optimizer=optimizer,
        step_fn=step_fn,
        sampler=sampler,
        counters=counters,
        loss=loss,
        lora=lora,
    )


def _with_lora(model: NanoGPTLMHeadModel, setup: RunSetup, init_from: str | None) -> AdapterRecord:
    """Load the base into `model`, freeze it and add the adapters (restored from the checkpoint on resume)."""
    record = setup.lora_record(init_from)
    load_state_into(model, load_weights(record.base), record.base)  # a LoRA base comes merged
    apply_lora(model, record.spec)  # A drawn from the seeded MLX RNG, B zero
    if setup.resume_from is not None:
        load_adapter_state(model, load_adapters(setup.resume_from, setup.model_cfg, record))
    return record


def _restore(
    setup: RunSetup,
    resume_from: Path,
    model: NanoGPTLMHeadModel,
    optimizer: optim.MultiOptimizer,
    sampler: BatchSampler,
    weights: bool = True,
) -> Counters:
    """Load the checkpoint `resume_from` into the model (unless `weights` is False: a LoRA run's adapters are
    already in), optimizer and sampler."""
    if weights:
        load_state_into(model, load_weights(resume_from), resume_from)
    state = load_train_state(resume_from, optimizer)
    counters = setup.restored_counters(state, needs=("sampler",))
    sampler.load_state(state["sampler"])
    setup.announce_resume(counters.step)
    return counters


# --- the run ------------------------------------------------------------------------------------------------


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
    loss_fn: MlxLoss | TwoPartLoss | None = None,
    loss_log: LossLog | None = None,
    peak_flops: float | None = None,
    purpose: str = "run",
    trackers: Sequence[str] | None = None,
    stage: dict[str, Any] | None = None,
    label: str = "train (mlx)",
) -> TrainResult:
    """Train `model_cfg` on `data_dir` into the run folder `out_dir` with MLX (see the module docstring).

    The arguments mean what they mean for `nanogpt.train.loop.train`; `dtype` must be fp32, and `device`
    and `compile` are ignored (MLX runs on its default device and the step is always compiled).
    """
    _check_supported(train_cfg)
    run = Path(out_dir)
    opened = open_run(
        model_cfg,
        train_cfg,
        Path(data_dir),
        run,
        resume=resume,
        force=force,
        purpose=purpose,
        init_from=init_from,
        stage=stage,
    )
    with opened as setup:
        session = _open_session(setup, init_from=init_from, loss_fn=loss_fn or cross_entropy_loss)
        apple_gpu = mx.default_device() == mx.gpu
        peak = peak_flops or default_peak_flops(torch.device("mps" if apple_gpu else "cpu"), "fp32")
        return run_session(
            session,
            peak_flops=peak,
            trackers=trackers,
            label=label,
            progress=progress,
            loss_log=loss_log,
        )


def _check_supported(cfg: TrainConfig) -> None:
    """What the MLX trainer does not do, refused before anything is written."""
    if cfg.dtype != "fp32":
        raise UserError(
            f"the MLX backend trains in fp32, not {cfg.dtype}; drop --dtype or use --backend torch"
        )
    if cfg.optimizer != "adamw":
        raise UserError(
            f"the MLX backend trains with AdamW, not {cfg.optimizer}; drop --optimizer or use --backend torch"
        )
