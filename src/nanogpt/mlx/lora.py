"""LoRA in MLX, mirroring `nanogpt.model.lora`: the same update, names and shapes, so adapter files move
between the backends unchanged.

`LoRALinear` is MLX's Linear with `lora_A` (r, in) and `lora_B` (out, r) beside its frozen weight:
y = x W^T + b + dropout(x) A^T B^T * alpha / r. A is drawn as torch's kaiming-uniform draws it (bound
1 / sqrt(in)), B starts at zero. In a file the tensors are named as PEFT names them, `<module>.lora_A.weight`.

    apply_lora(model, LoRASpec(8, 16.0, 0.0, ("qkv_proj", "fc1")))  # only the adapters are trainable
    mx.save_safetensors("adapter_model.safetensors", adapter_state(model))
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from nanogpt.mlx.model import NanoGPTLMHeadModel
from nanogpt.model.lora import A_SUFFIX, B_SUFFIX, LoRASpec

_MODULES = (("attn", "qkv_proj"), ("attn", "out_proj"), ("ff", "fc1"), ("ff", "fc2"))


class LoRALinear(nn.Linear):
    """A Linear with a trainable low-rank update: x W^T + b + dropout(x) A^T B^T * scale. (..., in) -> (..., out)."""

    def __init__(self, base: nn.Linear, spec: LoRASpec) -> None:
        out_features, in_features = base.weight.shape
        super().__init__(in_features, out_features, bias="bias" in base)
        self.weight = base.weight
        if "bias" in base:
            self.bias = base.bias
        bound = 1.0 / math.sqrt(in_features)
        self.lora_A = mx.random.uniform(-bound, bound, (spec.rank, in_features))
        self.lora_B = mx.zeros((out_features, spec.rank))
        self.scale = spec.scale
        self.lora_dropout = nn.Dropout(spec.dropout)

    def __call__(self, x: mx.array) -> mx.array:
        y = super().__call__(x)
        return y + (self.lora_dropout(x) @ self.lora_A.T) @ self.lora_B.T * self.scale


def lora_layers(model: NanoGPTLMHeadModel) -> dict[str, LoRALinear]:
    """The adapted layers by their module names (`transformer.blocks.N.attn.qkv_proj`)."""
    out = {}
    for i, block in enumerate(model.transformer.blocks):
        for part, name in _MODULES:
            layer = getattr(block, part)[name]
            if isinstance(layer, LoRALinear):
                out[f"transformer.blocks.{i}.{part}.{name}"] = layer
    return out


def apply_lora(model: NanoGPTLMHeadModel, spec: LoRASpec) -> NanoGPTLMHeadModel:
    """Freeze `model` and put a `LoRALinear` in place of each target Linear; only A and B stay trainable."""
    for block in model.transformer.blocks:
        for part, name in _MODULES:
            if name in spec.targets:
                parent = getattr(block, part)
                setattr(parent, name, LoRALinear(parent[name], spec))
    model.freeze()
    for layer in lora_layers(model).values():
        layer.unfreeze(keys=["lora_A", "lora_B"], recurse=False)
    return model


def adapter_state(model: NanoGPTLMHeadModel) -> dict[str, mx.array]:
    """The adapters only, by the shared names: `<module>.lora_A.weight` (r, in), `<module>.lora_B.weight` (out, r)."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[name + A_SUFFIX], out[name + B_SUFFIX] = layer.lora_A, layer.lora_B
    return out


def load_adapter_state(model: NanoGPTLMHeadModel, sd: dict[str, mx.array]) -> None:
    """Set the adapters from tensors by the shared names (checked beforehand against `adapter_shapes`)."""
    for name, layer in lora_layers(model).items():
        layer.lora_A = sd[name + A_SUFFIX].astype(mx.float32)
        layer.lora_B = sd[name + B_SUFFIX].astype(mx.float32)
    mx.eval(model.parameters())


def trainable_count(model: NanoGPTLMHeadModel) -> int:
    return sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
