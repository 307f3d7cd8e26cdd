"""The trainer: AdamW with a warmup + cosine schedule, accumulation, held-out eval, exact resume, DDP.

One loop serves every setting: CPU (fp32 by default), one GPU (bf16 autocast, TF32, fused AdamW,
optional torch.compile) and many GPUs through `torchrun` (DistributedDataParallel, one data stream per
rank, rank 0 alone logs, evaluates and writes checkpoints). A run folder holds:

    RUN/config.json  train_config.json  log.jsonl  loss.png
    RUN/last/   config.json  model.safetensors  state.safetensors  state.json   (resume point)
    RUN/best/   config.json  model.safetensors                                  (lowest val loss)

`--resume` restores weights, AdamW moments and step counts, the torch/python/numpy RNGs and the data
sampler, so a killed CPU run continues with bit-identical losses. Distillation reuses this loop through
the `loss_fn(model, x, y) -> loss` hook (default: cross-entropy on the data). The command's flags and
config resolution are `nanogpt.commands.train`.

    nanogpt train --data data/builtin --out runs/tiny --preset tiny --max-iters 2000

Many processes (gloo on CPU, nccl on CUDA); one node, then two nodes of 8 GPUs each:

    torchrun --standalone --nproc-per-node 8 -m nanogpt.cli train --data D --out RUN --preset card
    torchrun --nnodes 2 --nproc-per-node 8 --node-rank 0 --rdzv-id demo --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m nanogpt.cli train --data D --out RUN --preset card  # node-rank 1 too

Under DDP `--batch-size` is per process; `max_tokens` counts every process's tokens. Resuming a
multi-node run needs the run folder on a shared file system (every rank reads its optimizer state).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nanogpt.config import ModelConfig, TrainConfig, first_difference
from nanogpt.data.shards import BatchSampler, TokenData
from nanogpt.errors import UserError, write_fix
from nanogpt.folders import LOCK, MARKER, RunFolder, RunLock, claim, clear, mark
from nanogpt.kernels.device import autocast
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import (
    atomic_dir,
    check_resumable,
    join_rank_state,
    load_state_into,
    load_train_state,
    load_weights,
    resolve_checkpoint,
    rng_state,
    save_model,
    save_train_state,
    set_rng_state,
    split_rank_states,
    write_json,
    write_model_files,
)
from nanogpt.train.distributed import DistInfo, all_gather, setup_distributed
from nanogpt.train.optim import (
    LossFn,
    backward_micro_batches,
    cross_entropy_loss,
    default_peak_flops,
    flops_per_token,
    lr_at,
    make_optimizer,
    optimizer_step,
    schedule_warning,
)
from nanogpt.train.plot import plot_log, read_log, truncate_log
from nanogpt.train.progress import StepBar
from nanogpt.train.tracking import RunLog, open_run_log

EVAL_SEED = 0  # one fixed stream of val windows for every run and seed: val losses are comparable
KILL_ENV = "NANOGPT_TEST_KILL"  # test hook: "step:N" or "checkpoint:N" SIGKILLs the process there


@torch.no_grad()
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
    on_batch: Callable[[int, int], None] | None = None,
) -> float:
    """Mean cross-entropy over `iters` batches from a freshly seeded sampler: the same windows every call.

    `on_batch(done, iters)` is called before each batch (progress: an evaluation can take minutes)."""
    sampler = BatchSampler(shards, batch_size, context_length, seed)  # its own stream: training data untouched
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(iters):
        if on_batch is not None:
            on_batch(i, iters)
        x, y = sampler.next()
        with autocast(device, dtype):
            total += float(cross_entropy_loss(model, x.to(device), y.to(device)))
    model.train(was_training)
    return total / iters


def _maybe_kill(point: str, step: int) -> None:
    """Test hook: a real SIGKILL at a chosen point, to prove that a kill never costs more than a resume."""
    if os.environ.get(KILL_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


# --- the run ------------------------------------------------------------------------------------------------


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


_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


@contextlib.contextmanager
def run_folder(
    run: Path, model_cfg: ModelConfig, *, resume: bool, force: bool, kind: str = "run", main: bool = True
) -> Iterator[Path | None]:
    """Hold a run folder for one training session (both backends); yields the checkpoint to resume from.

    The main process refuses a folder it may not replace (nanogpt.folders.claim), locks it, clears a
    replaced one and marks it; on exit it unlocks, removes a folder it created but never wrote to, and turns
    Ctrl-C and a full or read-only disk into a line that says how to continue.
    """
    created, lock = not run.exists(), None
    try:
        if main:
            if not resume and claim(run, kind, force=force) and not run.is_dir():
                clear(run)  # a file at --out, replaced because of --force
            lock = RunLock(run).acquire()
            # look again under the lock: another process may have written the folder since
            if not resume and claim(run, kind, force=force):
                clear(run, keep=(LOCK,))
        src = _check_resume(run, model_cfg) if resume else None
        if main and not resume:
            mark(run, kind)
        yield src
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


def resume_hint(run: Path) -> str:
    """What to tell a user whose run stopped: resume from its checkpoint, or start it again."""
    if RunFolder(run).has_checkpoint():
        return f"{run}/last holds the last checkpoint; continue with the same command plus --resume"
    return "no checkpoint was written yet; run the same command again to start over"


def _oom_error(cfg: TrainConfig, device: torch.device, step: int) -> UserError:
    return UserError(
        f"out of memory at step {step} on {device} with --batch-size {cfg.batch_size}; use a smaller "
        "--batch-size with more --grad-accum-steps (same tokens per step) or --dtype bf16"
    )


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)


@dataclass
class _Session:
    """What one call to `train` works with; its methods are the loop's three jobs: step, eval, save."""

    model_cfg: ModelConfig
    cfg: TrainConfig
    run: Path
    data_dir: Path
    info: DistInfo
    device: torch.device
    model: NanoGPTLMHeadModel  # the bare network: what checkpoints store
    fwd: nn.Module  # the network to call: `model`, or torch.compile(model)
    net: nn.Module  # what training calls: `fwd`, or DDP(fwd)
    optimizer: torch.optim.Optimizer
    sampler: BatchSampler
    val_shards: list[np.ndarray]
    loss_fn: LossFn
    counters: Counters

    @property
    def tokens_per_step(self) -> int:
        c = self.cfg
        return c.batch_size * self.model_cfg.context_length * c.grad_accum_steps * self.info.world_size

    def train_step(self, lr: float, t_start: float, elapsed0: float) -> tuple[float, float | None, bool]:
        """One optimizer update: (mean loss over all ranks, grad norm, whether max_time is reached)."""
        c, step = self.cfg, self.counters.step + 1
        batches = [self.sampler.next() for _ in range(c.grad_accum_steps)]
        if hasattr(self.loss_fn, "log_path"):  # see optim.LossFn
            self.loss_fn.step = step  # type: ignore[attr-defined]
        try:
            loss_t = backward_micro_batches(self.net, batches, self.loss_fn, self.device, c.dtype)
            self.counters.elapsed = elapsed0 + time.perf_counter() - t_start
            time_up = c.max_time is not None and self.counters.elapsed >= c.max_time
            if self.info.enabled:  # one small collective: the mean loss, and "has any rank run out of time"
                import torch.distributed as dist

                packed = torch.stack([loss_t, torch.tensor(float(time_up), device=self.device)])
                dist.all_reduce(packed)
                loss_t, time_up = packed[0] / self.info.world_size, bool(packed[1] > 0)
            loss = float(loss_t)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss}")
            grad_norm = optimizer_step(self.model, self.optimizer, lr, c.grad_clip)
        except FloatingPointError as e:
            raise UserError(
                f"{e} at step {step}; stopped, {self.run}/last is left untouched: lower --learning-rate or check the data"
            ) from None
        except RuntimeError as e:
            raise (_oom_error(c, self.device, step) if _is_oom(e) else e) from None
        self.counters.step = step
        return loss, grad_norm, time_up

    def evaluate(self, on_batch: Callable[[int, int], None] | None = None) -> float:
        """Held-out loss (rank 0 only); records it in the counters, refuses a non-finite one."""
        c, step = self.cfg, self.counters.step
        try:
            val = estimate_loss(
                self.fwd,
                self.val_shards,
                batch_size=c.batch_size,
                iters=c.eval_iters,
                context_length=self.model_cfg.context_length,
                device=self.device,
                dtype=c.dtype,
                on_batch=on_batch,
            )
        except RuntimeError as e:
            raise (_oom_error(c, self.device, step) if _is_oom(e) else e) from None
        if not math.isfinite(val):
            raise UserError(
                f"val loss is {val} at step {step}; {self.run}/last is left untouched: lower --learning-rate"
            )
        if self.counters.first_val_loss is None:
            self.counters.first_val_loss = val
        self.counters.last_val_loss = val
        return val

    def save(self, val: float | None) -> None:
        """best/ (if `val` improved), then last/ with the full training state; every rank must call it."""
        ranks = all_gather(self.info, {"sampler": self.sampler.state(), **rng_state(self.device)})
        if not self.info.main:
            return
        best = self.counters.best_val_loss
        if val is not None and (best is None or val < best):
            self.counters.best_val_loss = val
            save_model(RunFolder(self.run).best, self.model)  # before last/: a kill in between replays to here
        tensors, plain = split_rank_states(ranks)
        step = self.counters.step
        info = {
            **asdict(self.counters),
            "tokens": step * self.tokens_per_step,
            "world_size": self.info.world_size,
            "ranks": plain,
            "train_config": self.cfg.to_dict(),
            "data_dir": str(self.data_dir.resolve()),
        }
        with atomic_dir(RunFolder(self.run).last) as tmp:
            write_model_files(tmp, self.model)
            save_train_state(tmp, self.optimizer, tensors, info)
            _maybe_kill("checkpoint", step)


def _open_session(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    data_dir: Path,
    run: Path,
    info: DistInfo,
    device: torch.device,
    src: Path | None,
    init_from: str | None,
    loss_fn: LossFn,
) -> _Session:
    """Check the run folder and data, build model/optimizer/sampler, restore them on resume."""
    data = TokenData(data_dir)
    if model_cfg.vocab_size < data.meta["vocab_size"]:
        raise UserError(
            f"vocab_size={model_cfg.vocab_size} is smaller than the data's {data.meta['vocab_size']}"
        )
    train_shards, val_shards = data.split("train"), data.split("val")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: fp32 storage, tensor-core speed

    torch.manual_seed(cfg.seed + info.rank)  # init (DDP broadcasts rank 0's weights) and this rank's dropout
    model = NanoGPTLMHeadModel(model_cfg)
    if init_from and src is None:
        folder = resolve_checkpoint(init_from)
        load_state_into(model, load_weights(folder), folder)
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    sampler = BatchSampler(
        train_shards, cfg.batch_size, model_cfg.context_length, cfg.seed, info.rank, model_cfg.vocab_size
    )
    counters = Counters()
    if src is not None:
        load_state_into(model, load_weights(src, device), src)
        state = load_train_state(src, optimizer)
        for group in optimizer.param_groups:  # flags given on resume win over the saved hyper-parameters
            group["weight_decay"] = cfg.weight_decay if group["weight_decay"] else 0.0
            if "betas" in group:  # AdamW's (Muon has its own momentum)
                group["betas"] = (cfg.beta1, cfg.beta2)
        try:
            counters = Counters(**{f.name: state.info[f.name] for f in fields(Counters)})
            ranks = state.info["ranks"]
        except (KeyError, TypeError) as e:
            raise UserError(
                f"training state in {src} is incomplete (no {e}); resume from another checkpoint or start again"
            ) from None
        if info.rank < len(ranks):
            rank_state = join_rank_state(ranks, state.tensors, info.rank)
            sampler.load_state(rank_state["sampler"])
            set_rng_state(rank_state, device)
        if len(ranks) != info.world_size and info.main:
            print(
                f"warning: resuming a {len(ranks)}-process run on {info.world_size}: the data order differs",
                file=sys.stderr,
            )
        if info.main:  # lines past the checkpoint will be written again
            for log in (RunFolder(run).log, getattr(loss_fn, "log_path", None)):
                if log is not None and log.is_file():
                    truncate_log(log, counters.step)
            print(f"resumed {run} at step {counters.step} of {cfg.max_iters}")

    fwd: nn.Module = torch.compile(model) if cfg.compile else model
    net = fwd
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    if info.main:
        run.mkdir(parents=True, exist_ok=True)
        model_cfg.save(RunFolder(run).config)
        write_json(RunFolder(run).train_config, cfg.to_dict())
    return _Session(
        model_cfg,
        cfg,
        run,
        data_dir,
        info,
        device,
        model,
        fwd,
        net,
        optimizer,
        sampler,
        val_shards,
        loss_fn,
        counters,
    )


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
    label: str = "train",
) -> TrainResult:
    """Train `model_cfg` on `data_dir` into the run folder `out_dir` (layout in the module docstring).

    `init_from` starts from a checkpoint's weights (fine-tuning, distillation); ignored on resume.
    `loss_fn(model, x, y) -> loss` replaces the training loss (evaluation stays plain cross-entropy).
    `peak_flops` (per device) is the MFU denominator; default: `default_peak_flops`.
    `force` replaces whatever is at `out_dir` (else only a run that never wrote a checkpoint); `kind` is
    the folder kind its marker records (`nanogpt.folders.KINDS`: "run", or "demo" for the demo's run).
    `trackers` mirror the log to TensorBoard/W&B/MLflow (`nanogpt.train.tracking`; None: on resume, the
    run's own). `label` names the run on its progress bar ("distill" for a distillation).
    """
    info, device = setup_distributed(train_cfg.device)
    run = Path(out_dir)
    try:
        with run_folder(run, model_cfg, resume=resume, force=force, kind=kind, main=info.main) as src:
            s = _open_session(
                model_cfg,
                train_cfg,
                Path(data_dir),
                run,
                info,
                device,
                src,
                init_from,
                loss_fn or cross_entropy_loss,
            )
            warning = schedule_warning(train_cfg)
            if warning and info.main and src is None:  # once the run is known to start
                print(warning, file=sys.stderr)
            with session_log(s.run, info.main, trackers, model_cfg, train_cfg, src, s.counters.step) as log:
                peak = (peak_flops or default_peak_flops(device, train_cfg.dtype)) * info.world_size
                bar = StepBar(_total_steps(s), s.counters.step, label, progress and info.main)
                result = _loop(s, bar, peak, log)
        if info.enabled:  # leave together: tearing gloo down while rank 0 still writes last/ can abort a rank
            import torch.distributed as dist

            dist.barrier()
        return result
    finally:
        if info.enabled:
            import gc

            import torch.distributed as dist

            # DDP's reducer holds the gloo group: free it now, or gloo's threads are torn down during interpreter
            # shutdown, which can abort the process ("terminate called without an active exception").
            s = None
            gc.collect()
            if dist.is_initialized():
                dist.destroy_process_group()


def session_log(
    run: Path,
    main: bool,
    trackers: Sequence[str] | None,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    src: Path | None,
    step: int,
) -> contextlib.AbstractContextManager[RunLog]:
    """The session's RunLog (both backends): log.jsonl plus the trackers on the main process."""
    if not main:
        return contextlib.nullcontext(RunLog(RunFolder(run).log))
    configs = {"model": model_cfg.to_dict(), "train": train_cfg.to_dict()}
    return open_run_log(RunFolder(run), trackers, configs, resume_step=step if src is not None else None)


def _total_steps(s: _Session) -> int:
    """The optimizer steps max_iters or max_tokens allow: the bar's length."""
    c = s.cfg
    return c.max_iters if not c.max_tokens else min(c.max_iters, math.ceil(c.max_tokens / s.tokens_per_step))


def _data_ce(loss_fn: LossFn, step: int) -> float | None:
    """A distillation loss's hard part at `step`: cross-entropy on the data batch, the mean over this process's
    micro-batches (`distill.losses.record_parts` keeps them in `history`); None for any other loss, whose
    logged `loss` already is that cross-entropy."""
    hard = []
    for rec in reversed(getattr(loss_fn, "history", None) or []):
        if rec.get("step") != step:
            break
        hard.append(rec["hard"])
    return sum(hard) / len(hard) if hard else None


def _loop(s: _Session, bar: StepBar, peak: float, log: RunLog) -> TrainResult:
    """Evaluate, step, log, checkpoint until max_iters / max_tokens / max_time."""
    c, k, main = s.cfg, s.counters, s.info.main
    fpt = flops_per_token(s.model_cfg, s.model.num_params(unique=True))

    def evaluate() -> float:
        val = s.evaluate(on_batch=bar.evaluating)
        bar.evaluated()
        bar.say(f"step {k.step}: val loss {val:.4f}, ppl {perplexity(val):.2f}")
        return val

    t_start, elapsed0 = time.perf_counter(), k.elapsed
    train_seconds, trained_tokens = 0.0, 0
    if k.step == 0 and main and k.first_val_loss is None:  # a new run: where it starts from
        val = evaluate()
        log.append({"step": 0, "tokens": 0, "val_loss": val, "val_ppl": perplexity(val)})
    t_log, tokens_log = time.perf_counter(), k.step * s.tokens_per_step
    stop = k.step >= c.max_iters or (c.max_tokens is not None and k.step * s.tokens_per_step >= c.max_tokens)
    s.fwd.train()
    while not stop:
        t0 = time.perf_counter()
        lr = lr_at(k.step + 1, c)
        loss, grad_norm, time_up = s.train_step(lr, t_start, elapsed0)
        train_seconds += time.perf_counter() - t0
        trained_tokens += s.tokens_per_step
        step, tokens = k.step, k.step * s.tokens_per_step
        stop = step >= c.max_iters or time_up or (c.max_tokens is not None and tokens >= c.max_tokens)
        is_eval = step % c.eval_interval == 0 or stop
        bar.step(loss, lr)
        record: dict[str, Any] = {}
        if main and (step % c.log_interval == 0 or is_eval):
            now = time.perf_counter()
            tps = (tokens - tokens_log) / max(now - t_log, 1e-9)
            record = {
                "step": step,
                "loss": loss,
                "lr": lr,
                "tokens": tokens,
                "tokens_per_s": round(tps, 1),
                "mfu": round(fpt * tps / peak, 5),
                "grad_norm": grad_norm,
                "elapsed": round(k.elapsed, 3),
            }
            if (ce := _data_ce(s.loss_fn, step)) is not None:  # distillation: `loss` mixes CE with the soft part
                record["train_ce"] = ce
            t_log, tokens_log = now, tokens
        if is_eval:
            val = evaluate() if main else None
            if val is not None:
                record.update(val_loss=val, val_ppl=perplexity(val))
        if record:
            log.append(record)
        if is_eval:
            s.save(val)
            t_log = time.perf_counter()  # throughput excludes eval and checkpoint time
        _maybe_kill("step", step)
    bar.close()

    if main and log.path.is_file():
        plot_log(read_log(log.path), RunFolder(s.run).plot, title=s.run.name)
    ppl = {n: None if v is None else perplexity(v) for n, v in asdict(k).items() if n.endswith("val_loss")}
    return TrainResult(
        steps=k.step,
        tokens=k.step * s.tokens_per_step,
        seconds=time.perf_counter() - t_start,
        tokens_per_s=trained_tokens / train_seconds if train_seconds else 0.0,
        first_val_loss=k.first_val_loss,
        first_val_ppl=ppl["first_val_loss"],
        last_val_loss=k.last_val_loss,
        last_val_ppl=ppl["last_val_loss"],
        best_val_loss=k.best_val_loss,
        best_val_ppl=ppl["best_val_loss"],
        run_dir=s.run,
    )
