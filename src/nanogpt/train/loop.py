"""The trainer: AdamW with a warmup + cosine schedule, accumulation, held-out eval, exact resume, DDP.

One loop serves every setting: CPU (fp32 by default), one GPU (bf16 autocast, TF32, fused AdamW,
optional torch.compile) and many GPUs through `torchrun` (DistributedDataParallel, one data stream per
rank, rank 0 alone logs, evaluates and writes checkpoints). A run folder holds:

    RUN/config.json  train_config.json  log.jsonl  loss.png
    RUN/last/   config.json  model.safetensors  state.safetensors  state.json   (resume point)
    RUN/best/   config.json  model.safetensors                                  (lowest val loss)

`--resume` restores weights, AdamW moments and step counts, the torch/python/numpy RNGs and the data
sampler, so a killed CPU run continues with bit-identical losses. Distillation reuses this loop through
the `loss_fn(model, x, y) -> loss` hook (`train.losses.LossFn`; default: cross-entropy on the data). This
module builds the PyTorch `_Session` (one step, evaluate, save) on the run's `train.session.RunSetup`;
`train.steps.run_session` drives its steps, the same for the MLX trainer. The command's flags and config resolution are `nanogpt.commands.train`.

    nanogpt train --data data/builtin --out runs/tiny --preset tiny --max-iters 2000

Many processes (gloo on CPU, nccl on CUDA); one node, then two nodes of 8 GPUs each:

    torchrun --standalone --nproc-per-node 8 -m nanogpt.cli train --data D --out RUN --preset card
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank 0 --rdzv-id demo --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m nanogpt.cli train --data D --out RUN --preset card  # node-rank 1 too

Under DDP `--batch-size` is per process; `max_tokens` counts every process's tokens. Resuming a
multi-node run needs the run folder on a shared file system (every rank reads its optimizer state).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nanogpt.config import ModelConfig, TrainConfig
from nanogpt.data.shards import IGNORE, BatchSampler
from nanogpt.errors import UserError
from nanogpt.folders import RunFolder
from nanogpt.kernels.device import autocast
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.model.lora import adapter_shapes, apply_lora, load_adapter_state
from nanogpt.train.adapters import AdapterRecord, load_adapter_file
from nanogpt.train.checkpoint import (
    atomic_dir,
    check_weights,
    join_rank_state,
    load_state_into,
    load_train_state,
    load_weights,
    rng_state,
    save_model,
    save_train_state,
    set_rng_state,
    split_rank_states,
    write_model_files,
)
from nanogpt.train.distributed import DistInfo, all_gather, setup_distributed
from nanogpt.train.losses import LossFn, LossLog
from nanogpt.train.optim import (
    TrainOptimizer,
    backward_micro_batches,
    cross_entropy_loss,
    default_peak_flops,
    flops_per_token,
    make_optimizer,
    optimizer_step,
    target_shares,
)
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

TorchLoss = LossFn[nn.Module, torch.Tensor]


def estimate_loss(
    model: nn.Module,
    shards: list[np.ndarray],
    *,
    batch_size: int,
    context_length: int,
    iters: int,
    device: torch.device,
    dtype: str = "fp32",
    seed: int = EVAL_SEED,
    on_batch: OnBatch | None = None,
) -> float:
    """Mean cross-entropy over `iters` batches from a freshly seeded sampler: the same windows every call.

    `on_batch(done, iters)` is called before each batch (progress: an evaluation can take minutes)."""
    sampler = BatchSampler(shards, batch_size, context_length, seed)  # its own stream: training's untouched
    return mean_loss(model, sampler, partial(_batch_loss, model, device, dtype), iters, on_batch)


def _batch_loss(
    model: nn.Module, device: torch.device, dtype: str, x: torch.Tensor, y: torch.Tensor
) -> float:
    """One batch's mean cross-entropy (fp32 loss under the run's autocast), no gradients kept."""
    with torch.no_grad(), autocast(device, dtype):
        return float(cross_entropy_loss(model, x.to(device), y.to(device)))


def _oom_error(cfg: TrainConfig, device: torch.device, step: int) -> UserError:
    return out_of_memory(cfg, str(device), step)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)


# --- the session --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _Session:
    """What one call to `train` works with (a `train.session.Session`): one step, evaluate, save."""

    setup: RunSetup
    info: DistInfo
    device: torch.device
    model: NanoGPTLMHeadModel  # the bare network: what checkpoints store
    fwd: nn.Module  # the network to call: `model`, or torch.compile(model)
    net: nn.Module  # what training calls: `fwd`, or DDP(fwd)
    optimizer: TrainOptimizer
    sampler: BatchSampler
    loss_fn: TorchLoss
    counters: Counters
    lora: AdapterRecord | None = None  # a LoRA run: checkpoints hold only the adapters, and this record

    @property
    def flops_per_token(self) -> float:
        return flops_per_token(self.setup.model_cfg, self.model.num_params(unique=True))

    def train_step(self, lr: float, clock: Clock) -> StepResult:
        """One optimizer update: the mean loss over all ranks, the grad norm, whether max_time is reached."""
        cfg, step = self.setup.cfg, self.counters.step + 1
        batches = [self.sampler.next() for _ in range(cfg.grad_accum_steps)]
        try:
            shares = self._target_shares([y for _, y in batches])
            loss_t = backward_micro_batches(self.net, batches, self.loss_fn, self.device, cfg.dtype, shares)
            loss, time_up = self._all_ranks(loss_t, clock.update(self.counters, cfg.max_time))
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss}")
            grad_norm = optimizer_step(self.model, self.optimizer, lr, cfg.grad_clip)
        except FloatingPointError as e:
            raise diverged(str(e), step, self.setup.run) from None
        except RuntimeError as e:
            raise (_oom_error(cfg, self.device, step) if _is_oom(e) else e) from None
        self.counters.step = step
        return StepResult(loss, grad_norm, time_up)

    def _target_shares(self, ys: list[torch.Tensor]) -> list[float] | None:
        """Chat data: each micro-batch's weight in the step by its trained targets, over all ranks (plain
        data: None, every micro-batch alike)."""
        if self.sampler.conversations is None:
            return None
        if not self.info.enabled:
            return target_shares(ys)
        import torch.distributed as dist

        total = torch.tensor(float(sum(int((y != IGNORE).sum()) for y in ys)), device=self.device)
        dist.all_reduce(total)
        return target_shares(ys, float(total) / (len(ys) * self.info.world_size))

    def _all_ranks(self, loss: torch.Tensor, time_up: bool) -> tuple[float, bool]:
        """The mean loss over all ranks, and whether any rank ran out of time: one small collective."""
        if not self.info.enabled:
            return float(loss), time_up
        import torch.distributed as dist

        packed = torch.stack([loss, torch.tensor(float(time_up), device=self.device)])
        dist.all_reduce(packed)
        return float(packed[0] / self.info.world_size), bool(packed[1] > 0)

    def evaluate(self, on_batch: OnBatch) -> float:
        """The held-out loss on the fixed val windows (rank 0 only)."""
        batch_loss = partial(_batch_loss, self.fwd, self.device, self.setup.cfg.dtype)
        try:
            return self.setup.val_loss(self.fwd, batch_loss, on_batch)
        except RuntimeError as e:
            raise (_oom_error(self.setup.cfg, self.device, self.counters.step) if _is_oom(e) else e) from None

    def save(self, best: bool) -> None:
        """best/ (if `best`), then last/ with the full training state; every rank must call it."""
        ranks = all_gather(self.info, {"sampler": self.sampler.state(), **rng_state(self.device)})
        if not self.info.main:
            return
        folder = RunFolder(self.setup.run)
        if best:
            save_model(folder.best, self.model, self.lora)  # before last/: a kill in between replays to here
        tensors, plain = split_rank_states(ranks)
        info = self.setup.state_info(asdict(self.counters), world_size=self.info.world_size, ranks=plain)
        with atomic_dir(folder.last) as tmp:
            write_model_files(tmp, self.model, self.lora)
            save_train_state(tmp, self.optimizer, tensors, info)


def _open_session(
    setup: RunSetup, *, info: DistInfo, device: torch.device, init_from: str | None, loss_fn: TorchLoss
) -> _Session:
    """Build model, optimizer and sampler on `setup`, restore them on resume, write the run's configs."""
    cfg = setup.cfg
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: fp32 storage, tensor-core speed
    torch.manual_seed(cfg.seed + info.rank)  # init (DDP broadcasts rank 0's weights) and this rank's dropout
    model = NanoGPTLMHeadModel(setup.model_cfg)
    lora = None
    if cfg.lora_rank:
        lora = _with_lora(model, setup, init_from)
    elif init_from and setup.resume_from is None:
        folder = setup.init_source(init_from)
        load_state_into(model, load_weights(folder), folder)
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    sampler = setup.train_sampler()
    counters = Counters()
    if setup.resume_from is not None:
        counters = _restore(setup, setup.resume_from, info, device, model, optimizer, sampler, lora is None)
    fwd, net = _wrap(model, cfg, info, device)
    if info.main:
        setup.write_configs()
    return _Session(
        setup=setup,
        info=info,
        device=device,
        model=model,
        fwd=fwd,
        net=net,
        optimizer=optimizer,
        sampler=sampler,
        loss_fn=loss_fn,
        counters=counters,
        lora=lora,
    )


def _with_lora(model: NanoGPTLMHeadModel, setup: RunSetup, init_from: str | None) -> AdapterRecord:
    """Load the base into `model`, freeze it and add the adapters (restored from the checkpoint on resume)."""
    record = setup.lora_record(init_from)
    load_state_into(model, load_weights(record.base), record.base)  # a LoRA base comes merged
    apply_lora(model, record.spec)  # A drawn from the seeded torch RNG, B zero
    if setup.resume_from is not None:
        adapters = load_adapter_file(setup.resume_from)
        expected = adapter_shapes(setup.model_cfg, record.spec)
        check_weights(expected, {k: tuple(v.shape) for k, v in adapters.items()}, setup.resume_from)
        load_adapter_state(model, adapters)
    return record


def _restore(
    setup: RunSetup,
    resume_from: Path,
    info: DistInfo,
    device: torch.device,
    model: NanoGPTLMHeadModel,
    optimizer: TrainOptimizer,
    sampler: BatchSampler,
    weights: bool = True,
) -> Counters:
    """Load the checkpoint `resume_from` into the model (unless `weights` is False: a LoRA run's adapters are
    already in), optimizer, sampler and this rank's RNGs."""
    cfg = setup.cfg
    if weights:
        load_state_into(model, load_weights(resume_from, device), resume_from)
    state = load_train_state(resume_from, optimizer)
    for group in optimizer.param_groups:  # flags given on resume win over the saved hyper-parameters
        group["weight_decay"] = cfg.weight_decay if group["weight_decay"] else 0.0
        if "betas" in group:  # AdamW's (Muon has its own momentum)
            group["betas"] = (cfg.beta1, cfg.beta2)
    counters = setup.restored_counters(state.info, needs=("ranks",))
    ranks = state.info["ranks"]
    if info.rank < len(ranks):
        rank_state = join_rank_state(ranks, state.tensors, info.rank)
        sampler.load_state(rank_state["sampler"])
        set_rng_state(rank_state, device)
    if info.main and len(ranks) != info.world_size:
        print(
            f"warning: resuming a {len(ranks)}-process run on {info.world_size}: the data order differs",
            file=sys.stderr,
        )
    setup.announce_resume(counters.step)
    return counters


def _wrap(
    model: nn.Module, cfg: TrainConfig, info: DistInfo, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """The network to call (compiled or not) and the one training calls (DDP around it under torchrun)."""
    fwd: nn.Module = torch.compile(model) if cfg.compile else model  # type: ignore[assignment]
    fwd.train()  # dropout on; an evaluation puts back the mode it found
    if not info.enabled:
        return fwd, fwd
    from torch.nn.parallel import DistributedDataParallel

    return fwd, DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)


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
    loss_fn: TorchLoss | None = None,
    loss_log: LossLog | None = None,
    peak_flops: float | None = None,
    purpose: str = "run",
    trackers: Sequence[str] | None = None,
    label: str = "train",
    stage: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model_cfg` on `data_dir` into the run folder `out_dir` (layout in the module docstring).

    `init_from` starts from a checkpoint's weights (fine-tuning, distillation); ignored on resume.
    `loss_fn(model, x, y) -> loss` replaces the training loss (evaluation stays plain cross-entropy);
    `loss_log` is the record such a loss keeps of its two halves (a `train.losses.LoggedLoss`'s `log`).
    `peak_flops` (per device) is the MFU denominator; default: `default_peak_flops`.
    `force` replaces whatever is at `out_dir` (else only a run that never wrote a checkpoint); `kind` is
    what its marker says the folder is for (`nanogpt.folders.PURPOSES`: "run", or "demo" for the demo's run).
    `trackers` mirror the log to TensorBoard/W&B/MLflow (`nanogpt.train.tracking`; None: on resume, the
    run's own). `label` names the run on its progress bar ("distill" for a distillation). `stage` says what
    this stage is for the run's lineage (`train.lineage`: a distillation's name and teacher).
    """
    info, device = setup_distributed(train_cfg.device)
    session: _Session | None = None
    try:
        with open_run(
            model_cfg,
            train_cfg,
            Path(data_dir),
            Path(out_dir),
            resume=resume,
            force=force,
            purpose=purpose,
            rank=info.rank,
            world_size=info.world_size,
            init_from=init_from,
            stage=stage,
        ) as setup:
            session = _open_session(
                setup, info=info, device=device, init_from=init_from, loss_fn=loss_fn or cross_entropy_loss
            )
            peak = (peak_flops or default_peak_flops(device, train_cfg.dtype)) * info.world_size
            result = run_session(
                session, peak_flops=peak, trackers=trackers, label=label, progress=progress, loss_log=loss_log
            )
        if info.enabled:  # leave together: tearing gloo down while rank 0 still writes last/ can abort a rank
            import torch.distributed as dist

            dist.barrier()
        return result
    finally:
        if info.enabled:
            session = None  # DDP's reducer holds the gloo group: free it before the group goes
            _leave_process_group()


def _leave_process_group() -> None:
    """Free what still holds the gloo group, then destroy it: left to interpreter shutdown, gloo's threads
    can abort the process ("terminate called without an active exception")."""
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
