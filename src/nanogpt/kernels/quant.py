"""Weight-only int8 for inference (`--dtype int8` in sample, serve, eval and bench): a quarter of fp32's bytes.

A batch-1 decode step is bound by reading the weights, so storing them in int8 (one byte, against bf16's
two and fp32's four) is the lever that is left once the kernels read at the memory's speed. Every
`nn.Linear` of the model becomes an `Int8Linear`: int8 weights with one scale per output row (symmetric,
absmax / 127), multiplied by ATen's weight-only int8 kernel (`torch._weight_int8pack_mm`, the one torchao
and gpt-fast use on CPU). That kernel is fast with bf16 activations and scales and many times slower with
fp32 ones on this project's CPU (docs/benchmarks.md, "int8"), so a layer's input is rounded to bf16 for the
product and its output comes back in the caller's dtype. The token table, tied to the lm_head, becomes an
`Int8Embedding` that reads the head's int8 rows and scales: one int8 copy serves both. The position table,
LayerNorm, attention and the KV cache stay fp32.

    model = quantize_int8(load_model("runs/demo"))   # in place; returns the model
    text = generate(model, ids, params)               # int8 weights, fp32 elsewhere

The held-out NLL difference against fp32 and the decode speed against bf16 are in docs/benchmarks.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Int8Linear(nn.Module):
    """y = (x @ W_q^T) * scale + bias, W_q int8 (out, in), one bf16 scale per output row.

    The scale is a bf16 number and W_q is rounded against exactly that number, so the bf16 scale adds no
    error of its own (a row's largest weight may clip by < 0.4% when absmax / 127 rounds down).
    `weight` gives the dequantized fp32 matrix (W_q * scale) for the code that multiplies by it directly,
    e.g. the fused head loss of the evaluator, so every path computes with the same quantized weights.
    """

    # buffers (registered in __init__), declared for the type checker: nn.Module's attributes are untyped
    weight_int8: torch.Tensor  # (out, in) int8
    scale: torch.Tensor  # (out,) bf16
    bias: torch.Tensor | None  # (out,) fp32

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float()
        tiny = torch.finfo(torch.bfloat16).tiny
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=tiny).to(torch.bfloat16)
        self.out_features, self.in_features = w.shape
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.device.type == "cpu":
            y = torch._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), self.weight_int8, self.scale)
        else:  # devices without that kernel: dequantize (correct, not faster)
            y = F.linear(rows.float(), self.weight)
        if self.bias is not None:  # for an fp32 x, promotion makes the add the cast back too (decode speed)
            y = torch.add(self.bias.to(x.dtype), y)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


class Int8Embedding(nn.Module):
    """A token table read from an `Int8Linear`'s rows: row i is W_q[i] * scale[i] (a tied lm_head's copy)."""

    def __init__(self, table: Int8Linear) -> None:
        super().__init__()
        self.table = [table]  # a list: the head owns the buffers, this module only reads them

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = self.table[0]
        return F.embedding(idx, t.weight_int8).float() * t.scale.float()[idx, None]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of `model` by an `Int8Linear`, and a token table tied to one by an
    `Int8Embedding` of its int8 rows, in place. The model is for inference from then on (the int8
    tensors are buffers, not parameters)."""
    tables = {
        id(m.weight): (parent, name)
        for parent in model.modules()
        for name, m in parent.named_children()
        if isinstance(m, nn.Embedding)
    }
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                q = Int8Linear(child.weight, child.bias).to(child.weight.device)
                setattr(parent, name, q)
                if id(child.weight) in tables:  # a tied table: the lookup reads the same int8 rows
                    owner, table_name = tables[id(child.weight)]
                    setattr(owner, table_name, Int8Embedding(q))
    return model.eval()


def apply_dtype(model: nn.Module, dtype: str) -> str:
    """For an inference `--dtype`: int8 quantizes `model`'s weights in place and computes in fp32 (the
    dtype returned, for autocast and the KV cache); fp32, bf16 and fp16 are returned as they are."""
    if dtype != "int8":
        return dtype
    quantize_int8(model)
    return "fp32"
