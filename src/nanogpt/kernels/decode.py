"""The decode fast path, as one object: `Decoder(model, dtype).step(tokens, cache)`.

A decode step is batch 1 (or a few streams) and bound by reading the weights. So each `nn.Linear` of the
model gets a copy of its weight made for decoding, used only inside a decode step: in the decode dtype, so
bf16 reads half the bytes and autocast does not re-cast every weight at every token, and in the layout the
one-row kernel reads fastest. `Decoder` is the whole interface, and neither the model nor its callers
(`infer/generate.py`, `serve/engine.py`, through them `bench/`) know more of it:

    decoder = Decoder(model, "bf16")                      # a precision: fp32, bf16 or fp16
    cache = KVCache.for_model(cfg, 1, decoder.device, decoder.cache_dtype)
    logits = decoder.prefill(prompt_ids, cache)           # many tokens: the stock weights
    logits = decoder.step(next_ids, cache)                # one token per row: the copies

Two tricks live here and nowhere else:

- **The class swap.** The first `step` makes each `nn.Linear` decode-aware in place, by swapping its class
  for a subclass whose forward multiplies by the copy inside a decode step of the copy's dtype (`DecodeLinear`),
  the way `torch.nn.utils.parametrize` swaps a module's class. The module stays the same object, with the
  same parameters, hooks, state_dict keys and printed name; outside a decode step, in another thread, or
  inside a compiled graph other than a compiled decode step's (`compile=True`) its forward is the stock
  one; it pickles and deep-copies as the plain layer. The copies stay on the layers for the next decoder of
  the same model (making them takes a while) and are remade when a weight changes; `Decoder.release` frees
  them and gives every layer its class back.
- **The global oneDNN switch.** On CPU, a one-row bf16/fp16 step runs with `torch.backends.mkldnn.enabled`
  off, a process-wide flag, so that PyTorch picks ATen's faster kernel; all such steps hold one lock
  (`cpu_decode_kernel` says what that means for other threads).

Which precision a layer's forward uses is a per-thread `ContextVar` set by the decoder for one call only,
so two streams in two threads, or a training step beside a server, never see each other's copies.
"""

from __future__ import annotations

import contextlib
import copyreg
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.torch_version import TorchVersion

from nanogpt.kernels.compiled import CompiledStep, StaticCache
from nanogpt.kernels.device import autocast, torch_dtype

# On CPU, ATen's own one-row bf16/fp16 kernel (fp32 accumulation) reads the stock (out, in) weights at about
# twice the speed of oneDNN's, which PyTorch picks whenever oneDNN is on (docs/benchmarks.md, "What changed":
# bf16 decode on CPU). fp32 goes to CPU BLAS either way and is faster on (in, out) copies.
# That kernel is vectorised on x86 from PyTorch 2.6 (before, only on ARM): older versions keep oneDNN.
NATIVE_GEMV_DTYPES = (torch.bfloat16, torch.float16)
NATIVE_GEMV_TORCH = TorchVersion(torch.__version__) >= "2.6"
_kernel_lock = threading.Lock()

# Up to this many rows, a one-token step multiplies by the copies; above, the stock weights. At the card's
# shapes the copies are never slower than noise up to 32 rows, and far faster in bf16 (docs/serving.md,
# "Kernels").
COPY_ROWS = 64

# The dtype whose copies the running decode call multiplies by; set by `Decoder` per thread (a ContextVar),
# so a concurrent stream or a training step in another thread never sees another's copies.
_STEP_DTYPE: ContextVar[torch.dtype | None] = ContextVar("nanogpt_decode_dtype", default=None)
# The same for a compiled decode step, which cannot read a ContextVar: set inside the traced function only
# (`_traced_step`), so its graph bakes the copies in and no other graph (training, eval) ever sees it set.
_TRACE_DTYPE: torch.dtype | None = None

# dtype -> (key of the weights it was made from, weight, bias or None, column blocks): 0 blocks is the stock
# (out, in) weight; n blocks is (n, in, out / n), bias (n, 1, out / n), zero-padded
DecodeCopy = tuple[tuple[object, ...], torch.Tensor, torch.Tensor | None, int]

_CacheIn = TypeVar("_CacheIn", contravariant=True)
CacheT = TypeVar("CacheT")


class CachedModel(Protocol[_CacheIn]):
    """What a `Decoder` needs of a model: an `nn.Module` called as `model(idx, cache, last_only=True)`.

    `kernels/` sits below `model/`, so the cache's type is a parameter here: for `NanoGPTLMHeadModel` it
    is `model.kv_cache.Cache | None`, and `Decoder.step` takes exactly what the model takes.
    """

    def __call__(
        self,
        idx: torch.Tensor,
        cache: _CacheIn,
        *,
        last_only: bool,
        attention: list[torch.Tensor] | None = ...,
    ) -> torch.Tensor: ...

    def modules(self) -> Iterator[nn.Module]: ...

    def parameters(self, recurse: bool = ...) -> Iterator[nn.Parameter]: ...


class Decoder(Generic[CacheT]):
    """The fast decode path of one model in one precision (see the module docstring).

    `dtype` is the precision name (fp32, bf16, fp16): bf16/fp16 run under autocast and their copies are
    in that dtype. `cache_dtype` is what the caller's KV cache must hold (autocast's keys and values come
    out in the autocast dtype); `device` is the model's. Every call runs under `torch.inference_mode()`.
    """

    def __init__(
        self,
        model: CachedModel[CacheT],
        dtype: str = "fp32",
        *,
        copy_rows: int = COPY_ROWS,
        compile: bool = False,
    ) -> None:
        self.model, self.dtype, self.copy_rows = model, dtype, copy_rows
        first = next(model.parameters())
        self.device = first.device
        self.cache_dtype = first.dtype if dtype == "fp32" else torch_dtype(dtype)  # refuses an unknown name
        self._prepared = False
        # kernels.compiled: the one-token step through torch.compile, for caches with a static view
        step = partial(_traced_step, model, self.cache_dtype, copy_rows)
        self.compiled = CompiledStep(step) if compile else None

    def prefill(
        self,
        tokens: torch.Tensor,
        cache: CacheT,
        *,
        last_only: bool = True,
        attention: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits of `tokens` (B, T) fed after what `cache` holds, through the stock weights.

        For prompts, and any call that is not a decode step (a full scoring forward passes cache=None,
        last_only=False). Returns (B, 1, V) with `last_only`, else (B, T, V); the copies are not made yet,
        so a prompt's first token never waits for them. It takes turns with other threads' CPU steps.
        `attention`, a list, is handed to the model, which then runs its eager attention and appends each
        layer's weights to it (serve's attention job), in this decoder's precision like any prefill.
        """
        with self._call(tokens, use_copies=False):
            if attention is None:
                return self.model(tokens, cache, last_only=last_only)
            return self.model(tokens, cache, last_only=last_only, attention=attention)

    def step(self, tokens: torch.Tensor, cache: CacheT) -> torch.Tensor:
        """Next-token logits (B, 1, V) of one decode step: `tokens` (B, 1), one new token per row.

        Up to `copy_rows` rows multiply by the decode copies (made at the first step, or by `prepare`);
        more rows, or more than one token per row, go through the stock weights as a prefill does. A
        decoder made with `compile=True` runs a one-token step on a `StaticCache` (a `KVCache`; not
        serve's slots) through its compiled graph instead, compiled at the first such step.
        """
        if self.compiled is not None and tokens.size(1) == 1 and isinstance(cache, StaticCache):
            if not self._prepared:
                self.prepare()  # before the first trace: the graph multiplies by the copies
            with torch.inference_mode(), autocast(self.device, self.dtype):
                return self.compiled(tokens, cache)
        use_copies = tokens.size(1) == 1 and tokens.size(0) <= self.copy_rows
        if use_copies and not self._prepared:
            self.prepare()
        with self._call(tokens, use_copies=use_copies):
            return self.model(tokens, cache, last_only=True)

    def prepare(self) -> None:
        """Make the copies now rather than at the first step (a server does so before its first request)."""
        with torch.inference_mode():
            _make_copies(self.model, self.cache_dtype)
        self._prepared = True

    def release(self) -> None:
        """Free the model's copies (of every precision) and give each layer its class back; `step` remakes them."""
        for m in self.model.modules():
            if isinstance(m, DecodeLinear):
                _set_class(m, m.plain_class)
                del m.decode_copies
        self._prepared = False

    @contextlib.contextmanager
    def _call(self, tokens: torch.Tensor, *, use_copies: bool) -> Iterator[None]:
        one_row = tokens.size(0) == 1 and tokens.size(1) == 1
        kernels = _decode_call(self.device, self.cache_dtype, one_row=one_row, use_copies=use_copies)
        with torch.inference_mode(), autocast(self.device, self.dtype), kernels:
            yield


def _traced_step(
    model: CachedModel[Any], dtype: torch.dtype, copy_rows: int, tokens: torch.Tensor, view: Any
) -> torch.Tensor:
    """What a `Decoder`'s `CompiledStep` compiles: one step of `model` on a static view of the cache, whose
    layers multiply by their `dtype` copies up to `copy_rows` rows (as the eager step does). The global that
    says so is set and cleared inside the traced code, so the graph bakes the choice in, and nothing outside
    the trace (another thread, a training graph) ever sees it set."""
    global _TRACE_DTYPE
    _TRACE_DTYPE = dtype if tokens.size(0) <= copy_rows else None
    try:
        return model(tokens, view, last_only=True)
    finally:
        _TRACE_DTYPE = None


def native_one_row(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether one-row decode matmuls in `dtype` on `device` go to ATen's kernel (oneDNN off)."""
    return device.type == "cpu" and dtype in NATIVE_GEMV_DTYPES and NATIVE_GEMV_TORCH


@contextlib.contextmanager
def cpu_decode_kernel(one_row: bool) -> Iterator[None]:
    """Run one bf16/fp16 CPU decode call with the matmul kernels it needs; calls of all threads take turns.

    A one-token step (`one_row`) runs with oneDNN off, so its matrix-vector products go to ATen's kernel; a
    call that feeds several tokens (a prefill) keeps oneDNN, which is far faster than ATen's for many
    rows (docs/benchmarks.md, "What changed": bf16 decode on CPU). The switch is a process-wide flag, so
    such calls hold one lock: a prefill in one stream never runs while another stream's step has oneDNN
    off. The user's own setting comes back after each step. Other torch work in other threads (a training
    loop beside a bf16 server) is not held back and may run a step's few milliseconds with oneDNN off:
    slower, never wrong.
    """
    with _kernel_lock:
        if not one_row:
            yield
            return
        before = torch.backends.mkldnn.enabled
        # torch's stubs type this module flag as its `ContextProp` descriptor; assigning a bool sets it
        torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
        try:
            yield
        finally:
            torch.backends.mkldnn.enabled = before


@contextlib.contextmanager
def _decode_call(
    device: torch.device, dtype: torch.dtype, *, one_row: bool, use_copies: bool
) -> Iterator[None]:
    """Around one model call of a `Decoder`: with `use_copies`, the decode-aware layers multiply by their
    `dtype` copies, in this thread only; a bf16/fp16 call on CPU runs inside `cpu_decode_kernel(one_row)`."""
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
    docs/benchmarks.md, "What changed": column blocks). ATen's bf16/fp16 kernel already splits its work
    across threads.
    """
    return torch.get_num_threads() if device.type == "cpu" and dtype == torch.float32 else 1


class DecodeLinear(nn.Linear):
    """What a `Decoder` makes of an `nn.Linear`: inside one of its decode calls, it multiplies by its copy.

    Never built directly: a layer's class becomes a subclass of this and of its own class, with its own
    class's name (`decode_class`). `decode_copies` maps a dtype to a `DecodeCopy`; its layout is the one
    the one-row kernel reads fastest: (in, out) row-major for fp32 CPU BLAS (faster than nn.Linear's:
    docs/benchmarks.md, "What changed"), cut into column blocks that one `bmm` streams on all CPU threads
    at once; the stock (out, in) for ATen's bf16/fp16 kernel.
    """

    decode_copies: dict[torch.dtype, DecodeCopy]
    plain_class: type[nn.Linear]  # the layer's own class, given back by `Decoder.release`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copy = None
        copies = getattr(self, "decode_copies", None)  # None once another thread dropped them
        if copies:  # compiled graphs use them only where `_traced_step` asks (training, eval: never)
            dtype = _TRACE_DTYPE if torch.compiler.is_compiling() else _STEP_DTYPE.get()
            copy = copies.get(dtype) if dtype is not None else None
        if copy is None:
            return super().forward(x)
        _, w, b, blocks = copy
        if not blocks:
            return F.linear(x.to(w.dtype), w, b)
        rows = x.reshape(1, -1, w.size(1)).to(w.dtype).expand(blocks, -1, -1)
        if b is None and torch.compiler.is_compiling():  # inductor would turn a one-row CPU `bmm` (not a
            b = w.new_zeros(())  # `baddbmm`) into a loop of its own, several times slower than BLAS's
        y = torch.bmm(rows, w) if b is None else torch.baddbmm(b, rows, w)  # (blocks, rows, out / blocks)
        y = y.transpose(0, 1).reshape(rows.size(1), -1)[:, : self.out_features]  # a view for one row
        return y.view(*x.shape[:-1], self.out_features)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickled and deep-copied as the plain layer: the copies are a cache the next decode remakes."""
        state = {k: v for k, v in self.__dict__.items() if k != "decode_copies"}
        # copyreg's stub omits `_reconstructor`, the function object.__reduce_ex__ itself returns here
        return copyreg._reconstructor, (self.plain_class, object, None), state  # type: ignore[attr-defined]


_decode_classes: dict[type[nn.Linear], type[DecodeLinear]] = {}


def decode_class(cls: type[nn.Linear]) -> type[DecodeLinear]:
    """The decode-aware subclass of an `nn.Linear` class, with its name (so the model prints the same)."""
    if cls not in _decode_classes:
        _decode_classes[cls] = type(cls.__name__, (DecodeLinear, cls), {"plain_class": cls})
    return _decode_classes[cls]


def _set_class(m: nn.Module, cls: type[nn.Module]) -> None:
    """The class swap itself (see the module docstring): the same object, now of class `cls`."""
    m.__class__ = cls


def _split_columns(w: torch.Tensor, blocks: int) -> torch.Tensor:
    """(in, out) -> (blocks, in, ceil(out / blocks)): contiguous column blocks, the last zero-padded."""
    w = F.pad(w, (0, -w.size(1) % blocks))
    return w.reshape(w.size(0), blocks, -1).transpose(0, 1).contiguous()


def _make_copies(model: CachedModel[Any], dtype: torch.dtype) -> None:
    """Make every `nn.Linear` of `model` decode-aware, with a copy of its weight in `dtype` (see `DecodeLinear`).

    Layers whose class has a forward of its own are left alone. The copy is (in, out) row-major, the layout
    CPU BLAS reads fastest in fp32, cut into `column_blocks` blocks; bf16/fp16 on CPU keep the (out, in)
    layout of ATen's one-row kernel (`cpu_decode_kernel`). In bf16 half the bytes are read with no
    per-token cast. Making the copies takes a noticeable time for the card's model, so a layer keeps its
    copy for later decoders and remakes it only when its weight changed (a new version, storage or device)
    or the thread count did.
    """
    for m in model.modules():
        if not isinstance(m, DecodeLinear):
            if not isinstance(m, nn.Linear) or type(m).forward is not nn.Linear.forward:
                continue
            m.__dict__.setdefault("decode_copies", {})  # before the swap: the new forward reads it
            _set_class(m, decode_class(type(m)))
        assert isinstance(m, DecodeLinear)
        _make_copy(m, dtype)


def _make_copy(m: DecodeLinear, dtype: torch.dtype) -> None:
    """(Re)make `m`'s `dtype` copy unless the one it holds was made from its current weights."""
    device = m.weight.device
    blocks = 0 if native_one_row(device, dtype) else column_blocks(device, dtype)
    params = [m.weight] if m.bias is None else [m.weight, m.bias]
    key = (device, blocks, *((p.data_ptr(), _version(p)) for p in params))
    kept = m.decode_copies.get(dtype)
    if kept is not None and kept[0] == key:
        return
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
