"""The MLX trainer: the PyTorch trainer's recipe (`nanogpt.train.loop`) with an `mx.compile`d step.

Same schedule (`nanogpt.train.optim.lr_at`), same AdamW decay groups (decay on the Linear weight matrices
only, never on embeddings, LayerNorm or biases), same clipping, accumulation, held-out eval (a fixed-seed
sampler re-created per eval), same data stream (`TokenData` + `BatchSampler`), same `log.jsonl` keys and
the same run folder: `config.json`, `train_config.json`, `log.jsonl`, `loss.png`, `best/` and `last/`
in the shared checkpoint format, so `nanogpt sample/eval/export` read an MLX run as they read a torch run.

`last/` adds `state.safetensors` (AdamW moments and step counts, by parameter name, under `mlx_optimizer.`)
and `state.json` (`"backend": "mlx"`, counters, sampler state, configs): no pickles. Resume is exact
because dropout masks need no saved RNG: the MLX generator is re-seeded from (seed, step) before every
step. An MLX `last/` is not resumable by the torch trainer (and vice versa): the optimizer layouts differ.

    result = train_mlx(preset("tiny"), TrainConfig(max_iters=200), "data/builtin", "runs/mlx-tiny")
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import torch
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from nanogpt.config import ModelConfig, TrainConfig
from nanogpt.data.shards import BatchSampler, TokenData
from nanogpt.errors import UserError
from nanogpt.folders import RunFolder
from nanogpt.mlx.checkpoint import (
    load_mlx_state_into,
    load_mlx_weights,
    save_mlx_model,
    write_mlx_model_files,
)
from nanogpt.mlx.model import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import (
    STATE_JSON,
    STATE_TENSORS,
    atomic_dir,
    resolve_checkpoint,
    write_json,
)
from nanogpt.train.loop import EVAL_SEED, TrainResult, perplexity, run_folder
from nanogpt.train.optim import default_peak_flops, flops_per_token, lr_at, schedule_warning
from nanogpt.train.plot import append_log, plot_log, read_log, truncate_log

MLXLossFn = Callable[[nn.Module, mx.array, mx.array], mx.array]
OPT_PREFIX = "mlx_optimizer."
BACKEND = "mlx"


# --- the math -------------------------------------------------------------------------------------------


def token_nll(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    """Per-token negative log-likelihood (B, T) in fp32: logits (B, T, V) scored against targets y (B, T)."""
    logits = model(x).astype(mx.float32)
    return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, y[..., None], axis=-1)[..., 0]


def cross_entropy_loss(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    """The default loss: mean next-token cross-entropy in fp32 (as `train.optim.cross_entropy_loss`)."""
    return token_nll(model, x, y).mean()


def decay_names(model: NanoGPTLMHeadModel) -> set[str]:
    """Parameter names that get weight decay: the 2-D Linear weights (as `train.optim.param_groups`).

    Embeddings (the token table is also the tied head), LayerNorm and biases are not decayed; an untied
    lm_head is a Linear and is decayed.
    """
    return {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.weight.ndim == 2
    }


def make_optimizer(model: NanoGPTLMHeadModel, cfg: TrainConfig) -> optim.MultiOptimizer:
    """AdamW with torch's update rule (bias correction on, eps 1e-8) over two groups: decay and no decay."""
    decay = decay_names(model)

    def adamw(weight_decay: float) -> optim.AdamW:
        return optim.AdamW(
            learning_rate=0.0,  # set before every step from lr_at
            betas=[cfg.beta1, cfg.beta2],
            eps=1e-8,
            weight_decay=weight_decay,
            bias_correction=True,
        )

    opt = optim.MultiOptimizer([adamw(cfg.weight_decay), adamw(0.0)], [lambda path, _: path in decay])
    opt.init(model.trainable_parameters())
    return opt


def optimizer_arrays(opt: optim.Optimizer) -> dict[str, mx.array]:
    """The optimizer state as flat named arrays (moments m/v per parameter, step, learning rate)."""
    return {OPT_PREFIX + k: v for k, v in tree_flatten(opt.state)}


def load_optimizer_arrays(opt: optim.Optimizer, arrays: dict[str, mx.array]) -> None:
    """Inverse of `optimizer_arrays`: the state is replaced exactly (same dtypes, same values)."""
    items = [(k[len(OPT_PREFIX) :], v) for k, v in arrays.items() if k.startswith(OPT_PREFIX)]
    saved = tree_unflatten(items)
    current = dict(tree_flatten(opt.state))
    if set(dict(items)) != set(current):
        raise UserError(
            "the saved MLX optimizer state does not fit this model; resume with the run's own config"
        )
    opt.state = saved


def clip_gradients(grads: dict, max_norm: float) -> tuple[dict, mx.array]:
    """Scale the gradients so their global L2 norm is at most max_norm (0 disables); returns the pre-clip norm.

    The scale is max_norm / (norm + 1e-6), capped at 1: torch's `clip_grad_norm_` rule.
    """
    if max_norm > 0:
        return optim.clip_grad_norm(grads, max_norm)
    norm = mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))
    return grads, norm


def make_train_step(
    model: NanoGPTLMHeadModel, opt: optim.Optimizer, cfg: TrainConfig, loss_fn: MLXLossFn = cross_entropy_loss
) -> Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]:
    """A compiled optimizer step: xs, ys (A, B, T) micro-batches -> (mean loss, pre-clip grad norm).

    Gradients of the A micro-batches are averaged (torch: each loss scaled by 1/A before backward), then
    clipped and applied. Model, optimizer and MLX RNG states are the compiled function's implicit state;
    the caller sets `opt.learning_rate` before each call.
    """
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(xs: mx.array, ys: mx.array) -> tuple[mx.array, mx.array]:
        n = xs.shape[0]
        total, grads = mx.array(0.0), None
        for i in range(n):  # unrolled at trace time: n is fixed for a run
            loss, g = loss_and_grad(model, xs[i], ys[i])
            grads = g if grads is None else tree_map(mx.add, grads, g)
            total = total + loss
        grads = tree_map(lambda g: g / n, grads)
        grads, norm = clip_gradients(grads, cfg.grad_clip)
        opt.update(model, grads)
        return total / n, norm

    return step


def to_mx(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[mx.array, mx.array]:
    """BatchSampler batches [(x, y) (B, T) int64] -> stacked mx int32 arrays (A, B, T)."""
    xs = np.stack([x.numpy() for x, _ in batches]).astype(np.int32)
    ys = np.stack([y.numpy() for _, y in batches]).astype(np.int32)
    return mx.array(xs), mx.array(ys)


def estimate_loss_mlx(
    model: NanoGPTLMHeadModel,
    shards: list[np.ndarray],
    *,
    batch_size: int,
    context_length: int,
    iters: int,
    seed: int = EVAL_SEED,
) -> float:
    """Mean cross-entropy over `iters` batches from a freshly seeded sampler: the same windows every call."""
    sampler = BatchSampler(shards, batch_size, context_length, seed)
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(iters):
        x, y = to_mx([sampler.next()])
        total += cross_entropy_loss(model, x[0], y[0]).item()
    model.train(was_training)
    return total / iters


def dropout_seed(seed: int, step: int) -> int:
    """The MLX RNG seed for optimizer step `step` (1-based): dropout depends on (seed, step) only."""
    return (seed * 1_000_003 + step) % 2**63


# --- the run ----------------------------------------------------------------------------------------------


def save_train_state_mlx(folder: Path, opt: optim.Optimizer, info: dict[str, Any]) -> None:
    arrays = optimizer_arrays(opt)
    mx.eval(arrays)
    mx.save_safetensors(str(folder / STATE_TENSORS), arrays, metadata={"format": "mlx", "library": "nanogpt"})
    write_json(folder / STATE_JSON, {"backend": BACKEND, **info})


def load_train_state_mlx(folder: Path, opt: optim.Optimizer) -> dict[str, Any]:
    """Load the optimizer state into `opt`; return state.json's contents."""
    info = json.loads((folder / STATE_JSON).read_text())
    if info.get("backend") != BACKEND:
        raise UserError(
            f"{folder} was written by the PyTorch trainer; resume it with the torch backend "
            "(or start an MLX run from its weights with init_from)"
        )
    try:
        arrays = mx.load(str(folder / STATE_TENSORS))
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(
            f"training state in {folder} is corrupt ({e}); resume from another checkpoint"
        ) from None
    load_optimizer_arrays(opt, arrays)  # type: ignore[arg-type]
    return info


def train_mlx(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    init_from: str | None = None,
    progress: bool = True,
    loss_fn: MLXLossFn | None = None,
    peak_flops: float | None = None,
    kind: str = "run",
) -> TrainResult:
    """Train `model_cfg` on `data_dir` into the run folder `out_dir` with MLX (see the module docstring).

    The arguments mean what they mean for `nanogpt.train.loop.train`; `dtype` must be fp32, and `device`
    and `compile` are ignored (MLX runs on its default device and the step is always compiled).
    """
    if train_cfg.dtype != "fp32":
        raise UserError(
            f"the MLX backend trains in fp32, not {train_cfg.dtype}; drop --dtype or use --backend torch"
        )
    run = Path(out_dir)
    with run_folder(run, model_cfg, resume=resume, force=force, kind=kind) as src:
        warning = schedule_warning(train_cfg)
        if warning and src is None:
            print(warning, file=sys.stderr)
        return _train_session(
            model_cfg, train_cfg, Path(data_dir), run, src, init_from, progress, loss_fn, peak_flops
        )


def _train_session(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    data_dir: Path,
    run: Path,
    src: Path | None,
    init_from: str | None,
    progress: bool,
    loss_fn: MLXLossFn | None,
    peak_flops: float | None,
) -> TrainResult:
    """train_mlx's work, inside the held run folder; `src` is the checkpoint to resume from, if any."""
    data = TokenData(data_dir)
    train_shards, val_shards = data.split("train"), data.split("val")
    block = model_cfg.context_length

    mx.random.seed(cfg.seed)
    model = NanoGPTLMHeadModel(model_cfg)
    if init_from and src is None:
        folder = resolve_checkpoint(init_from)
        load_mlx_state_into(model, load_mlx_weights(folder), folder)
    opt = make_optimizer(model, cfg)
    sampler = BatchSampler(train_shards, cfg.batch_size, block, cfg.seed)
    counters: dict[str, Any] = {
        "step": 0,
        "elapsed": 0.0,
        "best_val_loss": None,
        "first_val_loss": None,
        "last_val_loss": None,
    }
    if src is not None:
        load_mlx_state_into(model, load_mlx_weights(src), src)
        state = load_train_state_mlx(src, opt)
        counters.update({k: state[k] for k in counters})
        sampler.load_state(state["sampler"])
        truncate_log(RunFolder(run).log, counters["step"])
        print(f"resumed {run} at step {counters['step']} of {cfg.max_iters}")
    mx.eval(model.parameters(), opt.state)
    train_step = make_train_step(model, opt, cfg, loss_fn or cross_entropy_loss)  # after any state load

    run.mkdir(parents=True, exist_ok=True)
    model_cfg.save(RunFolder(run).config)
    write_json(RunFolder(run).train_config, cfg.to_dict())

    tokens_per_step = cfg.batch_size * block * cfg.grad_accum_steps
    fpt = flops_per_token(model_cfg, model.num_params(unique=True))
    apple_gpu = mx.default_device() == mx.gpu
    peak = peak_flops or default_peak_flops(torch.device("mps" if apple_gpu else "cpu"), "fp32")
    step = counters["step"]
    total = (
        min(cfg.max_iters, math.ceil(cfg.max_tokens / tokens_per_step)) if cfg.max_tokens else cfg.max_iters
    )
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        initial=step,
        desc="train (mlx)",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not progress,
    )

    def evaluate() -> float:
        val = estimate_loss_mlx(
            model, val_shards, batch_size=cfg.batch_size, context_length=block, iters=cfg.eval_iters
        )
        if not math.isfinite(val):
            raise UserError(
                f"val loss is {val} at step {step}; {run}/last is left untouched: lower --learning-rate"
            )
        if counters["first_val_loss"] is None:
            counters["first_val_loss"] = val
        counters["last_val_loss"] = val
        if progress:
            bar.write(f"step {step}: val loss {val:.4f}, ppl {perplexity(val):.2f}")
        return val

    def save_checkpoint(val: float | None) -> None:
        if val is not None and (counters["best_val_loss"] is None or val < counters["best_val_loss"]):
            counters["best_val_loss"] = val
            save_mlx_model(RunFolder(run).best, model)  # best first: a kill before last/ only replays to here
        info = {
            **counters,
            "step": step,
            "tokens": step * tokens_per_step,
            "sampler": sampler.state(),
            "train_config": cfg.to_dict(),
            "data_dir": str(data_dir.resolve()),
        }
        with atomic_dir(RunFolder(run).last) as tmp:
            write_mlx_model_files(tmp, model)
            save_train_state_mlx(tmp, opt, info)

    t_start = time.perf_counter()
    elapsed0 = counters["elapsed"]
    train_seconds, trained_tokens = 0.0, 0
    if src is None:
        val = evaluate()
        append_log(RunFolder(run).log, {"step": 0, "tokens": 0, "val_loss": val, "val_ppl": perplexity(val)})
    t_log, tokens_log = time.perf_counter(), step * tokens_per_step
    stop = step >= cfg.max_iters or (cfg.max_tokens is not None and step * tokens_per_step >= cfg.max_tokens)
    model.train()
    while not stop:
        t0 = time.perf_counter()
        lr = lr_at(step + 1, cfg)
        xs, ys = to_mx([sampler.next() for _ in range(cfg.grad_accum_steps)])
        opt.learning_rate = lr
        mx.random.seed(dropout_seed(cfg.seed, step + 1))
        loss_a, norm_a = train_step(xs, ys)
        mx.eval(loss_a, norm_a, model.parameters(), opt.state)
        loss, norm = loss_a.item(), norm_a.item()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            # the weights were already updated in memory; nothing is saved, so last/ keeps the last good state
            what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
            raise UserError(
                f"{what} at step {step + 1}; stopped, {run}/last is left untouched: lower --learning-rate "
                "or check the data"
            )
        step += 1
        counters["elapsed"] = elapsed0 + time.perf_counter() - t_start
        time_up = cfg.max_time is not None and counters["elapsed"] >= cfg.max_time
        train_seconds += time.perf_counter() - t0
        trained_tokens += tokens_per_step
        tokens = step * tokens_per_step
        stop = step >= cfg.max_iters or time_up or (cfg.max_tokens is not None and tokens >= cfg.max_tokens)
        is_eval = step % cfg.eval_interval == 0 or stop
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)
        record: dict[str, Any] | None = None
        if step % cfg.log_interval == 0 or is_eval:
            now = time.perf_counter()
            tps = (tokens - tokens_log) / max(now - t_log, 1e-9)
            record = {
                "step": step,
                "loss": loss,
                "lr": lr,
                "tokens": tokens,
                "tokens_per_s": round(tps, 1),
                "mfu": round(fpt * tps / peak, 5),
                "grad_norm": norm if cfg.grad_clip > 0 else None,
                "elapsed": round(counters["elapsed"], 3),
            }
            t_log, tokens_log = now, tokens
        if is_eval:
            val = evaluate()
            if record is not None:
                record.update(val_loss=val, val_ppl=perplexity(val))
                append_log(RunFolder(run).log, record)
            save_checkpoint(val)
            t_log = time.perf_counter()  # throughput excludes eval and checkpoint time
        elif record is not None:
            append_log(RunFolder(run).log, record)
    bar.close()

    if RunFolder(run).log.is_file():
        plot_log(read_log(RunFolder(run).log), RunFolder(run).plot, title=run.name)
    best, first, last = counters["best_val_loss"], counters["first_val_loss"], counters["last_val_loss"]
    return TrainResult(
        steps=step,
        tokens=step * tokens_per_step,
        seconds=time.perf_counter() - t_start,
        tokens_per_s=trained_tokens / train_seconds if train_seconds else 0.0,
        first_val_loss=first,
        first_val_ppl=None if first is None else perplexity(first),
        last_val_loss=last,
        last_val_ppl=None if last is None else perplexity(last),
        best_val_loss=best,
        best_val_ppl=None if best is None else perplexity(best),
        run_dir=run,
    )
