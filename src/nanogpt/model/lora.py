"""LoRA in PyTorch: a low-rank update B @ A beside a frozen Linear, and the merge that folds it back in.

`LoRALinear` is the block's `Linear` with two more parameters, `lora_A` (r, in) and `lora_B` (out, r), both
in torch's (out, in) convention: y = x W^T + b + dropout(x) A^T B^T * alpha / r. Its weight and bias keep
their names, so the base's checkpoint loads unchanged; the adapter tensors are named as PEFT names them
(`<module>.lora_A.weight`), the same names and shapes as `nanogpt.mlx.lora`, so an adapter file moves
between the backends as it is. B starts at zero: a fresh adapter leaves the model's output unchanged.

    lora = LoRASpec(rank=8, alpha=16.0, dropout=0.0, targets=("qkv_proj", "fc1"))
    apply_lora(model, lora)               # base frozen, only the adapters train
    save_file(adapter_state(model), ...)  # just the adapters
    merge_lora(model)                     # plain Linear layers again: W + B @ A * alpha / r
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanogpt.config import ModelConfig
from nanogpt.model.gpt import Linear, NanoGPTLMHeadModel

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"  # PEFT's names: (r, in) and (out, r)


@dataclass(frozen=True)
class LoRASpec:
    """What the adapters are: their rank, scale (alpha / rank), input dropout and target layers."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(Linear):
    """A Linear with a trainable low-rank update: x W^T + b + dropout(x) A^T B^T * scale. (..., in) -> (..., out)."""

    def __init__(self, base: nn.Linear, spec: LoRASpec) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the base's own tensors: no copy
        self.scale, self.p = spec.scale, spec.dropout
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(spec.rank, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, spec.rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as PEFT does for A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        h = F.dropout(x, self.p, self.training) if self.p > 0 else x
        return y + (h @ self.lora_A.t().to(h.dtype)) @ self.lora_B.t().to(h.dtype) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + B @ A * scale, detached (the weight a plain Linear needs to compute the same function)."""
        return merge_weight(self.weight, self.lora_A, self.lora_B, self.scale)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.lora_A.shape[0]}"


def merge_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The merged weight (out, in): w + (b @ a) * scale, computed in fp32 and returned in w's dtype."""
    return (w.detach().float() + (b.detach().float() @ a.detach().float()) * scale).to(w.dtype)


def target_names(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of the block Linears LoRA adapts (`transformer.blocks.N.attn.qkv_proj`, ...), in model order."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".blocks." in f".{name}" and name.rsplit(".", 1)[-1] in targets
    ]


def apply_lora(model: NanoGPTLMHeadModel, spec: LoRASpec) -> NanoGPTLMHeadModel:
    """Freeze every parameter of `model` and put a `LoRALinear` in place of each target Linear (in place).

    Only the adapters' A and B then have requires_grad; the model's state_dict keeps the base's names."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in target_names(model, spec.targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), spec))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters only, by PEFT's names: `<module>.lora_A.weight` (r, in), `<module>.lora_B.weight` (out, r)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_layers(model).items():
        out[name + A_SUFFIX] = m.lora_A.detach().contiguous()
        out[name + B_SUFFIX] = m.lora_B.detach().contiguous()
    return out


def adapter_shapes(cfg: ModelConfig, spec: LoRASpec) -> dict[str, tuple[int, ...]]:
    """The adapter tensors a model of `cfg` with `spec` has: name -> shape (what a file must hold)."""
    d, f = cfg.d_model, cfg.d_ff
    dims = {"attn.qkv_proj": (d, 3 * d), "attn.out_proj": (d, d), "ff.fc1": (d, f), "ff.fc2": (f, d)}
    out: dict[str, tuple[int, ...]] = {}
    for i in range(cfg.n_layers):
        for module, (fan_in, fan_out) in dims.items():
            if module.rsplit(".", 1)[-1] in spec.targets:
                name = f"transformer.blocks.{i}.{module}"
                out[name + A_SUFFIX], out[name + B_SUFFIX] = (spec.rank, fan_in), (fan_out, spec.rank)
    return out


def load_adapter_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (names and shapes already checked) into the model's `LoRALinear` layers."""
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            m.lora_A.copy_(sd[name + A_SUFFIX])
            m.lora_B.copy_(sd[name + B_SUFFIX])


def merge_lora(model: NanoGPTLMHeadModel) -> NanoGPTLMHeadModel:
    """Replace each `LoRALinear` by a plain Linear holding W + B @ A * scale (in place; trainable again)."""
    for name, m in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        plain = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight = nn.Parameter(m.merged_weight())
        if m.bias is not None:
            plain.bias = nn.Parameter(m.bias.detach())
        setattr(model.get_submodule(parent_name), child, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merge_state(
    sd: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """A checkpoint's weights with adapters folded in: `<m>.weight` += B @ A * scale for each adapted `<m>`."""
    out = dict(sd)
    for key in adapters:
        if key.endswith(A_SUFFIX):
            module = key[: -len(A_SUFFIX)]
            w = out[module + ".weight"]
            out[module + ".weight"] = merge_weight(w, adapters[key], adapters[module + B_SUFFIX], scale)
    return out


def trainable_count(model: nn.Module) -> int:
    """Parameters that train (a tied tensor once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
