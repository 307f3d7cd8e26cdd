"""The decode fast path: weight copies for decode steps, and the CPU kernel that reads them fastest.

A decode step is batch 1 and bound by reading the weights. So each `nn.Linear` of the model gets a copy of
its weight made for decoding, used only inside a decode step: in the decode dtype, so bf16 reads half the
bytes and autocast does not re-cast every weight at every token, and in the layout the one-row kernel
reads fastest. This is the whole hook, and the model knows nothing of it:

    prepare_decode_weights(model, dtype)                    # once per stream, after the prefill
    with decode_step(device, dtype, one_row=True):          # around each later model call
        logits = model(x, cache=cache, last_only=True)
    drop_decode_weights(model)                              # optional: frees the copies

`prepare_decode_weights` makes each `nn.Linear` decode-aware in place, by swapping its class for a
subclass whose forward multiplies by the copy inside a `decode_step` of the copy's dtype, the way
`torch.nn.utils.parametrize` swaps a module's class. The module stays the same object, with the same
parameters, hooks, state_dict keys and printed name; outside a decode step, in another thread, or inside
a compiled graph its forward is the stock one. `drop_decode_weights` gives every layer its class back.
"""

from __future__ import annotations

import contextlib
import copyreg
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.torch_version import TorchVersion

# On CPU, ATen's own one-row bf16/fp16 kernel (fp32 accumulation) reads the stock (out, in) weights at about
# twice the speed of oneDNN's, which PyTorch picks whenever oneDNN is on (measured on the card's 50,257 x 384
# head: 1.6 ms against 3.0-3.6 ms). fp32 goes to CPU BLAS either way and is faster on (in, out) copies.
# That kernel is vectorised on x86 from PyTorch 2.6 (before, only on ARM): older versions keep oneDNN.
NATIVE_GEMV_DTYPES = (torch.bfloat16, torch.float16)
NATIVE_GEMV_TORCH = TorchVersion(torch.__version__) >= (2, 6)
_kernel_lock = threading.Lock()

# The dtype whose copies the running decode step multiplies by; set by `decode_step` per thread (a
# ContextVar), so a concurrent stream or a training step in another thread never sees another's copies.
_STEP_DTYPE: ContextVar[torch.dtype | None] = ContextVar("nanogpt_decode_dtype", default=None)

# dtype -> (key of the weights it was made from, weight, bias or None, column blocks): 0 blocks is the stock
# (out, in) weight; n blocks is (n, in, out / n), bias (n, 1, out / n), zero-padded
DecodeCopy = tuple[tuple, torch.Tensor, torch.Tensor | None, int]


def native_one_row(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether one-row decode matmuls in `dtype` on `device` go to ATen's kernel (oneDNN off)."""
    return device.type == "cpu" and dtype in NATIVE_GEMV_DTYPES and NATIVE_GEMV_TORCH


@contextlib.contextmanager
def cpu_decode_kernel(one_row: bool) -> Iterator[None]:
    """Run one bf16/fp16 CPU decode step with the matmul kernels it needs; steps of all threads take turns.

    A one-token step (`one_row`) runs with oneDNN off, so its matrix-vector products go to ATen's kernel; a
    step that feeds several tokens (a prefill) keeps oneDNN, which is ~10x faster than ATen's for many
    rows (measured: 64 ms against 612 ms for 512 rows through the card's bf16 head). The switch is a
    process-wide flag, so such steps hold one lock: a prefill in one stream never runs while another
    stream's step has oneDNN off. The user's own setting comes back after each step. Other torch work in
    other threads (a training loop beside a bf16 server) is not held back and may run a step's few
    milliseconds with oneDNN off: slower, never wrong.
    """
    with _kernel_lock:
        if not one_row:
            yield
            return
        before = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            yield
        finally:
            torch.backends.mkldnn.enabled = before


@contextlib.contextmanager
def decode_step(
    device: torch.device, dtype: torch.dtype, *, one_row: bool, use_copies: bool = True
) -> Iterator[None]:
    """Around one model call of a decode stream (or any bf16/fp16 CPU call that must take turns with them).

    With `use_copies`, the layers `prepare_decode_weights` made decode-aware multiply by their `dtype`
    copies, in this thread only; a prefill passes use_copies=False (its copies may not exist yet, and
    stock kernels suit many rows). A bf16/fp16 call on CPU runs inside `cpu_decode_kernel(one_row)`.
    """
    token = _STEP_DTYPE.set(dtype if use_copies else None)
    try:
        if native_one_row(device, dtype):
            with cpu_decode_kernel(one_row):
                yield
        else:
            yield
    finally:
        _STEP_DTYPE.reset(token)


def column_blocks(device: torch.device, dtype: torch.dtype) -> int:
    """How many column blocks a transposed decode copy is cut into: one per CPU thread for fp32, else 1.

    A one-row fp32 product is one CPU BLAS call that streams the weight from memory at what one core
    reads, whatever the thread count. Cut into blocks, one `bmm` gives each thread its own block to
    stream, so the decode step reads at the bandwidth of all the cores (the figures are in
    docs/benchmarks.md, "What changed": column blocks). ATen's bf16/fp16 kernel already splits its work across threads.
    """
    return torch.get_num_threads() if device.type == "cpu" and dtype == torch.float32 else 1


class DecodeLinear(nn.Linear):
    """What `prepare_decode_weights` makes of an `nn.Linear`: inside a `decode_step`, it multiplies by its copy.

    Never built directly: a layer's class becomes a subclass of this and of its own class, with its own
    class's name (`decode_class`). `decode_copies` maps a dtype to a `DecodeCopy`; its layout is the one
    the one-row kernel reads fastest: (in, out) row-major for fp32 CPU BLAS (up to 2.6x faster than
    nn.Linear's), cut into column blocks that one `bmm` streams on all CPU threads at once; the stock
    (out, in) for ATen's bf16/fp16 kernel.
    """

    decode_copies: dict[torch.dtype, DecodeCopy]
    plain_class: type[nn.Linear]  # the layer's own class, given back by `drop_decode_weights`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copy = None
        copies = getattr(self, "decode_copies", None)  # None once another thread dropped them
        if copies and not torch.compiler.is_compiling():  # compiled graphs: training, eval
            dtype = _STEP_DTYPE.get()
            copy = copies.get(dtype) if dtype is not None else None
        if copy is None:
            return super().forward(x)
        _, w, b, blocks = copy
        if not blocks:
            return F.linear(x.to(w.dtype), w, b)
        rows = x.reshape(1, -1, w.size(1)).to(w.dtype).expand(blocks, -1, -1)
        y = torch.bmm(rows, w) if b is None else torch.baddbmm(b, rows, w)  # (blocks, rows, out / blocks)
        y = y.transpose(0, 1).reshape(rows.size(1), -1)[:, : self.out_features]  # a view for one row
        return y.view(*x.shape[:-1], self.out_features)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickled and deep-copied as the plain layer: the copies are a cache the next decode remakes."""
        state = {k: v for k, v in self.__dict__.items() if k != "decode_copies"}
        return copyreg._reconstructor, (self.plain_class, object, None), state


_decode_classes: dict[type, type] = {}


def decode_class(cls: type[nn.Linear]) -> type[DecodeLinear]:
    """The decode-aware subclass of an `nn.Linear` class, with its name (so the model prints the same)."""
    if cls not in _decode_classes:
        _decode_classes[cls] = type(cls.__name__, (DecodeLinear, cls), {"plain_class": cls})
    return _decode_classes[cls]


def _split_columns(w: torch.Tensor, blocks: int) -> torch.Tensor:
    """(in, out) -> (blocks, in, ceil(out / blocks)): contiguous column blocks, the last zero-padded."""
    w = F.pad(w, (0, -w.size(1) % blocks))
    return w.reshape(w.size(0), blocks, -1).transpose(0, 1).contiguous()


def prepare_decode_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Make every `nn.Linear` of `model` decode-aware, with a copy of its weight in `dtype` (see `DecodeLinear`).

    Layers whose class has a forward of its own are left alone. Decode steps are batch 1 and bound by
    reading the weights. The copy is (in, out) row-major, the layout CPU BLAS reads up to 2.6x faster in
    fp32 (3.0 vs 7.8 ms for the card's 50,257 x 384 head), cut into `column_blocks` blocks; bf16/fp16 on
    CPU keep the (out, in) layout of ATen's one-row kernel (`cpu_decode_kernel`). In bf16 half the bytes
    are read with no per-token cast. Making the copies takes ~50 ms for the card's model, so a layer keeps
    its copy for later streams and remakes it only when its weight changed (a new version, storage or
    device) or the thread count did. `drop_decode_weights` frees them.
    """
    for m in model.modules():
        if not isinstance(m, DecodeLinear):
            if not isinstance(m, nn.Linear) or type(m).forward is not nn.Linear.forward:
                continue
            m.__dict__.setdefault("decode_copies", {})  # before the swap: the new forward reads it
            m.__class__ = decode_class(type(m))
        device = m.weight.device
        blocks = 0 if native_one_row(device, dtype) else column_blocks(device, dtype)
        params = [m.weight] if m.bias is None else [m.weight, m.bias]
        key = (device, blocks, *((p.data_ptr(), _version(p)) for p in params))
        kept = m.decode_copies.get(dtype)
        if kept is None or kept[0] != key:
            w, bias = m.weight.detach().to(dtype), None if m.bias is None else m.bias.detach().to(dtype)
            if blocks:
                w = _split_columns(w.t(), blocks)
                bias = None if bias is None else _split_columns(bias[None], blocks)  # (blocks, 1, out/blocks)
            m.decode_copies[dtype] = (key, w.contiguous(), bias, blocks)


def _version(t: torch.Tensor) -> int | object:
    """The tensor's in-place version counter; a never-equal token for inference tensors, which have none."""
    try:
        return t._version
    except RuntimeError:
        return object()


def drop_decode_weights(model: nn.Module) -> None:
    """Free the copies `prepare_decode_weights` made and give each layer its own class back."""
    for m in model.modules():
        if isinstance(m, DecodeLinear):
            m.__class__ = m.plain_class
            del m.decode_copies
