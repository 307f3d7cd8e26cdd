"""Weight copies for decode steps, and the CPU kernel that reads them fastest.

A decode step is batch 1 and bound by reading the weights, so each `model.Linear` can hold a copy of its
weight made for decoding (`Linear.decode_copies`, used only inside a decode step): in the decode dtype, so
bf16 reads half the bytes and autocast does not re-cast every weight at every token, and in the layout the
one-row kernel reads fastest. `generate._decode` makes them after the prefill and runs each one-token step
on CPU in bf16/fp16 inside `cpu_decode_kernel`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.torch_version import TorchVersion

from nanogpt.model.gpt import Linear

# On CPU, ATen's own one-row bf16/fp16 kernel (fp32 accumulation) reads the stock (out, in) weights at about
# twice the speed of oneDNN's, which PyTorch picks whenever oneDNN is on (measured on the card's 50,257 x 384
# head: 1.6 ms against 3.0-3.6 ms). fp32 goes to CPU BLAS either way and is faster on (in, out) copies.
# That kernel is vectorised on x86 from PyTorch 2.6 (before, only on ARM): older versions keep oneDNN.
NATIVE_GEMV_DTYPES = (torch.bfloat16, torch.float16)
NATIVE_GEMV_TORCH = TorchVersion(torch.__version__) >= (2, 6)
_kernel_lock = threading.Lock()


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


def decode_kernel(
    device: torch.device, dtype: torch.dtype, one_row: bool
) -> contextlib.AbstractContextManager:
    """`cpu_decode_kernel(one_row)` for a bf16/fp16 model call on CPU, else nothing to do."""
    if native_one_row(device, dtype):
        return cpu_decode_kernel(one_row)
    return contextlib.nullcontext()


def column_blocks(device: torch.device, dtype: torch.dtype) -> int:
    """How many column blocks a transposed decode copy is cut into: one per CPU thread for fp32, else 1.

    A one-row fp32 product is one CPU BLAS call that streams the weight from memory at what one core
    reads (~24 GB/s here) whatever the thread count. Cut into blocks, one `bmm` gives each thread its own
    block to stream: the card's head reads at 27-34 GB/s on 2 cores, and its fp32 decode went from 90-103
    to 110-139 tokens/s. ATen's bf16/fp16 kernel already splits its work across threads (no gain measured).
    """
    return torch.get_num_threads() if device.type == "cpu" and dtype == torch.float32 else 1


def _split_columns(w: torch.Tensor, blocks: int) -> torch.Tensor:
    """(in, out) -> (blocks, in, ceil(out / blocks)): contiguous column blocks, the last zero-padded."""
    w = F.pad(w, (0, -w.size(1) % blocks))
    return w.reshape(w.size(0), blocks, -1).transpose(0, 1).contiguous()


def prepare_decode_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give every `Linear` of `model` a copy of its weight in `dtype` for decode steps (see `Linear`).

    Decode steps are batch 1 and bound by reading the weights. The copy is (in, out) row-major, the layout
    CPU BLAS reads up to 2.6x faster in fp32 (3.0 vs 7.8 ms for the card's 50,257 x 384 head), cut into
    `column_blocks` blocks; bf16/fp16 on CPU keep the (out, in) layout of ATen's one-row kernel
    (`cpu_decode_kernel`). In bf16 half the bytes are read with no per-token cast. Making the copies
    takes ~50 ms for the card's model, so a layer keeps its copy for later streams and remakes it only
    when its weight changed (a new version, storage or device) or the thread count did.
    `drop_decode_weights` frees them.
    """
    for m in model.modules():
        if not isinstance(m, Linear):
            continue
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


def drop_decode_weights(model: torch.nn.Module) -> None:
    """Free the decode copies `prepare_decode_weights` made (the next decode makes them again)."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.decode_copies.clear()
