"""The optimisation math shared by every trainer: schedule, AdamW groups, one step, FLOPs.

Pure functions, unit-tested on their own; `train/loop.py` (PyTorch), `mlx/train/` (its mirror) and
`distill/losses.py` build their loops from them.

    opt = make_optimizer(model, cfg, device)
    loss = backward_micro_batches(model, batches, cross_entropy_loss, device)
    optimizer_step(model, opt, lr_at(step, cfg), cfg.grad_clip)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from nanogpt.config import ModelConfig, TrainConfig
from nanogpt.data.shards import IGNORE
from nanogpt.errors import UserError
from nanogpt.kernels.device import autocast
from nanogpt.train.losses import LossFn


def schedule_warning(cfg: TrainConfig) -> str | None:
    """One line when warmup covers most of the run (e.g. --max-iters 30 with the card's 500 warmup
    iterations): the learning rate would stay near zero throughout and the weights would barely move."""
    if cfg.max_iters == 0 or cfg.warmup_iters <= cfg.max_iters / 2:
        return None
    share = min(100, round(100 * cfg.warmup_iters / cfg.max_iters))
    return (
        f"warning: warmup_iters={cfg.warmup_iters} covers {share}% of max_iters={cfg.max_iters}, so the learning "
        f"rate stays low for most of the run; pass e.g. --warmup-iters {max(1, cfg.max_iters // 10)}"
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer update number `step` (1-based; step 0 is the start, lr 0).

    Linear warmup 0 -> learning_rate over warmup_iters, cosine decay to min_lr at
    `lr_decay_iters or max_iters`, then flat at min_lr.
    """
    decay_end = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.learning_rate * step / cfg.warmup_iters
    if step >= decay_end:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / (decay_end - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on the Linear weight matrices only (qkv_proj, out_proj, fc1, fc2).

    No decay on biases and LayerNorm (decay would only pull shifts/scales away from their useful values),
    nor on the embeddings: the token table (which is also the tied lm_head) and the position table.
    Decay shrinks every row at every step, but the input side of a token's row is trained only when
    that token occurs, so rare-token rows drift towards zero. nanoGPT decays every >= 2-D tensor, tied
    table included; we follow minGPT (and GPT-2 practice as commonly reproduced) and exclude them.
    An untied lm_head is a Linear weight and is decayed. Every trainable parameter appears exactly once
    (LoRA's adapters, plain tensors of a `LoRALinear`, go undecayed; its frozen base to no group).
    """
    embedding_ids = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    decay_ids = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.Linear) and m.weight.dim() >= 2 and id(m.weight) not in embedding_ids
    }
    params = [p for p in model.parameters() if p.requires_grad]  # a tied tensor once; a frozen LoRA base never
    decay = [p for p in params if id(p) in decay_ids]
    no_decay = [p for p in params if id(p) not in decay_ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def orthogonalize(
    m: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """Muon's Newton-Schulz iteration: `m` (2-D) pushed towards the nearest semi-orthogonal matrix, in `dtype`.

    Scaled to spectral norm <= 1 (the Frobenius norm bounds it), then `steps` rounds of the quintic
    x <- a x + (b g + c g^2) x with g = x x^T, on the wide orientation so that g is the small Gram matrix.
    The result keeps `dtype`; the caller adds it to fp32 weights.
    """
    a, b, c = coefficients
    tall = m.size(0) > m.size(1)
    x = (m.T if tall else m).to(dtype)
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b g + c g^2
        x = torch.addmm(x, poly, x, beta=a)  # a x + poly x
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` with its Newton-Schulz iteration in `ns_dtype` (`orthogonalize`).

    torch's runs it in bf16 on every device: native on GPUs, emulated on CPUs without bf16 instructions,
    where it cost more than the rest of the step (the demo's 16 matrices on an AVX2 CPU: 830 ms a step in bf16
    against 35 ms in fp32; docs/demo.md). `make_optimizer` passes fp32 on CPUs and bf16 elsewhere. The groups,
    the state (`momentum_buffer`) and so the checkpoints are torch's; with bf16 a step is torch's step.
    """

    def __init__(self, params: Any, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay, beta = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - beta)  # the momentum: an average of the gradients
                update = p.grad.lerp(buf, beta) if group["nesterov"] else buf
                update = orthogonalize(
                    update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
                )
                p.mul_(1 - lr * decay)
                p.add_(update, alpha=-lr * muon_lr_scale(group["adjust_lr_fn"], p.shape))
        return loss


def muon_lr_scale(rule: str | None, shape: torch.Size) -> float:
    """The factor on Muon's lr for a (rows, cols) matrix, as torch.optim.Muon's `adjust_lr_fn` names it:
    "match_rms_adamw" gives the update AdamW's RMS (0.2 sqrt(max(rows, cols))); "original" or None,
    sqrt(max(1, rows / cols))."""
    rows, cols = shape[0], shape[1]
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


class MuonAdamW:
    """Muon for the blocks' weight matrices and AdamW for everything else, stepped as one optimizer.

    It offers what the trainer and the checkpoint use of an optimizer: `param_groups` (Muon's first),
    `step`, `zero_grad`, and one `state_dict` whose parameter indices run on from Muon's into AdamW's.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.parts = (muon, adamw)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.parts for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.parts:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for opt in self.parts:
            sd = opt.state_dict()
            state |= {offset + i: s for i, s in sd["state"].items()}
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError(
                f"{len(sd['param_groups'])} parameter groups saved, {len(self.param_groups)} here"
            )
        first = 0
        for opt in self.parts:
            groups = sd["param_groups"][first : first + len(opt.param_groups)]
            first += len(groups)
            ids = [i for g in groups for i in g["params"]]
            base = min(ids, default=0)
            opt.load_state_dict(
                {
                    "state": {i - base: sd["state"][i] for i in ids if i in sd["state"]},
                    "param_groups": [{**g, "params": [i - base for i in g["params"]]} for g in groups],
                }
            )


TrainOptimizer = torch.optim.Optimizer | MuonAdamW  # what make_optimizer gives: AdamW, or Muon + AdamW


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> TrainOptimizer:
    """AdamW over `param_groups` (`cfg.optimizer == "adamw"`, the card's), or `MuonAdamW` ("muon").

    AdamW uses the fused kernel on CUDA and CPU (3-5x faster than the default one on CPU:
    docs/benchmarks.md, "What changed"), torch's default implementation elsewhere. Muon (torch.optim.Muon:
    momentum orthogonalised by Newton-Schulz) takes the blocks' Linear weight matrices, the decayed group;
    embeddings, an untied head, biases and LayerNorm gains stay with AdamW, as in modded-nanogpt. Its lr is
    scaled to match AdamW's update size ("match_rms_adamw"), so one lr and one schedule serve both. On a
    CPU its Newton-Schulz iteration runs in fp32 (`Muon`): torch's bf16 is emulated on most CPUs.
    """
    extra = {"fused": True} if device.type in ("cuda", "cpu") else {}
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, **extra)
    if not hasattr(torch.optim, "Muon"):
        raise UserError(
            f"--optimizer muon needs torch.optim.Muon (torch 2.9 or newer; this is {torch.__version__})"
        )
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    matrices = [p for p in groups[0]["params"] if p is not head]
    groups[0]["params"] = [p for p in groups[0]["params"] if p is head]  # an untied head, else empty
    muon = Muon(
        matrices,
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        adjust_lr_fn="match_rms_adamw",
        ns_dtype=torch.float32 if device.type == "cpu" else torch.bfloat16,
    )
    return MuonAdamW(muon, torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, **extra))


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token, forward + backward: 6N for the weights + 12·L·T·d for attention.

    N excludes the position table (a lookup, no matmul) but counts the tied token table once: it is
    the lm_head matmul. This is the usual PaLM-appendix estimate, not a measured count.
    """
    n = n_params - cfg.context_length * cfg.d_model
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.context_length * cfg.d_model


def default_peak_flops(device: torch.device, dtype: str) -> float:
    """A rough dense peak FLOP/s for MFU when `--peak-flops` is not given (an estimate, not a spec sheet)."""
    low = dtype in ("bf16", "fp16")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32) in {
            "H100": (989e12, 494e12),
            "H200": (989e12, 494e12),
            "A100": (312e12, 156e12),
        }.items():
            if key in name:
                return half if low else tf32
        return 100e12 if low else 50e12
    if device.type == "mps":
        return 7e12  # Apple M2 Pro class GPU
    # CPU: ~3 GHz x 2 FMA units x 8 fp32 lanes x 2 FLOPs = ~96 GFLOP/s per core (AVX2)
    return torch.get_num_threads() * 96e9


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default `loss_fn`: next-token cross-entropy in fp32 whatever the autocast dtype.

    Through `model(x, targets=y)` (also under DDP, whose forward hooks must run), which never holds the
    (B, T, vocab) logits.
    """
    return model(x, targets=y)


def target_shares(ys: list[torch.Tensor], mean: float | None = None) -> list[float]:
    """Each micro-batch's scored targets (not IGNORE) over the mean micro-batch's count (`mean`, by default
    these micro-batches'; under DDP all ranks'), so that accumulating `loss_i * share_i / len` weights every
    target alike: chat batches hold different numbers of assistant tokens. Plain batches get exactly 1.0."""
    counts = [int((y != IGNORE).sum()) for y in ys]
    mean = sum(counts) / len(counts) if mean is None else mean
    return [c / mean if mean > 0 else 1.0 for c in counts]


def backward_micro_batches(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: LossFn[nn.Module, torch.Tensor],
    device: torch.device,
    dtype: str = "fp32",
    shares: list[float] | None = None,
) -> torch.Tensor:
    """Accumulate gradients over micro-batches (each loss scaled by share/len) and return the mean loss.

    `shares` (`target_shares`; default 1.0 each) weight each micro-batch's mean loss by its targets. Under
    DDP the gradient all-reduce runs only on the last micro-batch (`no_sync` on the others).
    """
    shares = shares or [1.0] * len(batches)
    total = torch.zeros((), device=device)
    for i, ((x, y), share) in enumerate(zip(batches, shares, strict=True)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last = i == len(batches) - 1
        sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if isinstance(model, nn.parallel.DistributedDataParallel) and not last:
            sync = model.no_sync()
        with sync:
            with autocast(device, dtype):
                loss = loss_fn(model, x, y) * share  # x 1.0 is exact: plain batches are unchanged
            (loss / len(batches)).backward()
        total += loss.detach().float()
    return total / len(batches)


def optimizer_step(model: nn.Module, optimizer: TrainOptimizer, lr: float, grad_clip: float) -> float | None:
    """Clip (unless grad_clip is 0), set the lr, step, zero the grads; returns the pre-clip grad norm.

    A non-finite gradient norm raises FloatingPointError before the weights are touched.
    """
    norm = None
    if grad_clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        if not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"gradient norm is {norm}")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
