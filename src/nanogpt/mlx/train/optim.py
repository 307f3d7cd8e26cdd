"""The MLX optimisation math: `nanogpt.train.optim`'s loss, AdamW groups and clipping, and a compiled step.

The schedule (`lr_at`), the FLOP count and the warmup warning are the PyTorch side's own functions; this
module holds only what MLX computes differently: the loss in MLX, AdamW as an `optim.MultiOptimizer` over
the same decay groups, torch's clipping rule and the `mx.compile`d update over the accumulated micro-batches.

    opt = make_optimizer(model, cfg)
    step = make_train_step(model, opt, cfg)
    opt.learning_rate = lr_at(1, cfg)
    loss, grad_norm = step(*to_mx([sampler.next() for _ in range(cfg.grad_accum_steps)]))
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol, runtime_checkable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import torch
from mlx.utils import tree_flatten, tree_map

from nanogpt.config import TrainConfig
from nanogpt.mlx.losses import IGNORE
from nanogpt.mlx.model import NanoGPTLMHeadModel
from nanogpt.train.losses import LossFn, LossLog


def token_nll(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    """Per-token negative log-likelihood (B, T) in fp32: logits (B, T, V) scored against targets y (B, T).

    A target of IGNORE (an untrained prompt token or padding of a chat batch) scores 0, with zero gradient.
    """
    return logits_nll(model(x).astype(mx.float32), y)


def logits_nll(logits: mx.array, y: mx.array) -> mx.array:
    """Per-token NLL (B, T) of fp32 logits (B, T, V) against y (B, T); IGNORE targets score 0."""
    valid = y != IGNORE
    picked = mx.take_along_axis(logits, mx.where(valid, y, 0)[..., None], axis=-1)[..., 0]
    return mx.where(valid, mx.logsumexp(logits, axis=-1) - picked, 0.0)


def cross_entropy_loss(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    """The default loss: mean next-token cross-entropy in fp32 over the targets that are not IGNORE
    (as `train.optim.cross_entropy_loss`; 0 when every target is IGNORE)."""
    return token_nll(model, x, y).sum() / mx.maximum(mx.sum(y != IGNORE), 1)


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


def clip_gradients(grads: dict, max_norm: float) -> tuple[dict, mx.array]:
    """Scale the gradients so their global L2 norm is at most max_norm (0 disables); returns the pre-clip norm.

    The scale is max_norm / (norm + 1e-6), capped at 1: torch's `clip_grad_norm_` rule.
    """
    if max_norm > 0:
        return optim.clip_grad_norm(grads, max_norm)
    norm = mx.sqrt(sum((mx.sum(mx.square(g)) for _, g in tree_flatten(grads)), mx.array(0.0)))
    return grads, norm


Halves = tuple[mx.array, mx.array, mx.array]  # (total, hard, soft): a loss and its two halves
# (model, x, y, batch, constants) -> Halves: a two-part loss on one micro-batch, with what its teacher gave
# for that micro-batch (`batch`, arrays) and what stays the same every step (`constants`: a teacher's head)
PartsFn = Callable[[nn.Module, mx.array, mx.array, tuple[mx.array, ...], tuple[mx.array, ...]], Halves]
# xs, ys (A, B, T), batch inputs (each (A, ...)), constants -> (mean loss, pre-clip grad norm, halves (A, 2))
PartsStep = Callable[
    [mx.array, mx.array, tuple[mx.array, ...], tuple[mx.array, ...]], tuple[mx.array, mx.array, mx.array]
]


@runtime_checkable
class TwoPartLoss(Protocol):
    """A distillation loss for the MLX trainer (`nanogpt.distill.mlx_teachers`): the teacher works eagerly,
    before the compiled step, and the loss on what it gave is computed inside the step.

    `inputs(x, y)` runs once per micro-batch (the teacher's forward, an API call, text it wrote) and returns
    arrays of fixed shapes; `constants` are passed to every step unchanged (a teacher's head); `parts` is the
    loss inside the step; `record(hard, soft)` keeps each micro-batch's halves in `log` afterwards.
    """

    log: LossLog
    constants: tuple[mx.array, ...]

    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[mx.array, ...]: ...

    def parts(
        self,
        model: nn.Module,
        x: mx.array,
        y: mx.array,
        batch: tuple[mx.array, ...],
        const: tuple[mx.array, ...],
    ) -> Halves: ...

    def record(self, hard: float, soft: float) -> None: ...


def make_train_step(
    model: NanoGPTLMHeadModel,
    opt: optim.Optimizer,
    cfg: TrainConfig,
    loss_fn: LossFn[nn.Module, mx.array] = cross_entropy_loss,
) -> Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]:
    """A compiled optimizer step: xs, ys (A, B, T) micro-batches -> (mean loss, pre-clip grad norm)."""
    step = make_parts_step(model, opt, cfg, OnePartLoss(loss_fn).parts)
    return lambda xs, ys: step(xs, ys, (), ())[:2]


class OnePartLoss:
    """A plain loss (`loss_fn(model, x, y)`) as a `TwoPartLoss`: no teacher, all of it the hard half, nothing
    logged (the trainer logs the loss itself)."""

    constants: tuple[mx.array, ...] = ()

    def __init__(self, loss_fn: LossFn[nn.Module, mx.array]) -> None:
        self.loss_fn, self.log = loss_fn, LossLog()

    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[mx.array, ...]:
        return ()

    def parts(self, model: nn.Module, x: mx.array, y: mx.array, *_: tuple[mx.array, ...]) -> Halves:
        loss = self.loss_fn(model, x, y)
        return loss, loss, mx.array(0.0)

    def record(self, hard: float, soft: float) -> None:
        pass


def make_parts_step(
    model: NanoGPTLMHeadModel, opt: optim.Optimizer, cfg: TrainConfig, parts: PartsFn
) -> PartsStep:
    """The compiled optimizer step of a two-part loss (`PartsStep`); `make_train_step`'s for one loss.

    Gradients of the A micro-batches are averaged, each weighted by its share of the scored targets
    (`target_shares`; torch: each loss scaled by share/A before backward), then clipped and applied. Model, optimizer and MLX RNG states are the compiled function's implicit state;
    the caller sets `opt.learning_rate` before each call. Each micro-batch's halves come back for the log.
    """

    def loss(
        model: nn.Module, x: mx.array, y: mx.array, batch: tuple[mx.array, ...], const: tuple[mx.array, ...]
    ) -> tuple[mx.array, mx.array]:
        total, hard, soft = parts(model, x, y, batch, const)
        return total, mx.stack([hard, soft])  # value_and_grad differentiates the first output only

    loss_and_grad = nn.value_and_grad(model, loss)
    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(
        xs: mx.array, ys: mx.array, batch: tuple[mx.array, ...], const: tuple[mx.array, ...]
    ) -> tuple[mx.array, mx.array, mx.array]:
        n = xs.shape[0]
        shares = target_shares(ys)
        total, grads, halves = mx.array(0.0), None, []
        for i in range(n):  # unrolled at trace time: n is fixed for a run
            (loss, two), g = loss_and_grad(model, xs[i], ys[i], tuple(a[i] for a in batch), const)
            g = tree_map(lambda a, w=shares[i]: a * w, g)  # x 1.0 is exact: plain batches are unchanged
            grads = g if grads is None else tree_map(mx.add, grads, g)
            total = total + loss * shares[i]
            halves.append(two)
        grads = tree_map(lambda g: g / n, grads)
        grads, norm = clip_gradients(grads, cfg.grad_clip)
        opt.update(model, grads)
        return total / n, norm, mx.stack(halves)

    return step


def target_shares(ys: mx.array) -> mx.array:
    """`nanogpt.train.optim.target_shares` of (A, B, T) micro-batch targets: each one's scored targets over
    the mean count, so every target weighs alike across a step of chat batches (exactly 1.0 for plain ones)."""
    counts = (ys != IGNORE).sum(axis=(1, 2)).astype(mx.float32)
    mean = counts.sum() / ys.shape[0]
    return mx.where(mean > 0, counts / mx.maximum(mean, 1.0), 1.0)


def to_mx(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[mx.array, mx.array]:
    """BatchSampler batches [(x, y) (B, T) int64] -> stacked mx int32 arrays (A, B, T)."""
    xs = np.stack([x.numpy() for x, _ in batches]).astype(np.int32)
    ys = np.stack([y.numpy() for _, y in batches]).astype(np.int32)
    return mx.array(xs), mx.array(ys)
