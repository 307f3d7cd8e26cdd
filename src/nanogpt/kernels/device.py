"""Where code runs and in what precision: device resolution and autocast, one place for every command.

dev = resolve_device("auto")          # cuda if available, else mps, else cpu; never an error
with autocast(dev, "bf16"): logits = model(x)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from pathlib import Path

import torch

from nanogpt.errors import SettingError, UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but no CUDA GPU is available; use cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} asked for but MPS is not available; use cpu or auto")
    return dev


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager[None]:
    """Mixed precision for bf16/fp16 (weights stay fp32); a no-op for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch_dtype(dtype))


BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86-64 instructions that multiply bf16 natively


def cpuinfo_field(name: str) -> str | None:
    """The value of the first `name : value` line of /proc/cpuinfo (Linux); None where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags on x86-64 Linux (/proc/cpuinfo); None elsewhere, where they are not read."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    flags = cpuinfo_field("flags")
    return None if flags is None else set(flags.split())


def emulated_bf16_warning(device: torch.device, dtype: str, flags: set[str] | None) -> str | None:
    """A warning for bf16 on an x86-64 CPU without bf16 instructions (`flags`: `cpu_flags()`): its matmuls of
    several rows are emulated there, slower than fp32's (docs/serving.md: 16 streams at a third of fp32's
    rate on an AVX2 EPYC). None where the CPU has them or its flags are unknown."""
    if device.type != "cpu" or dtype != "bf16" or flags is None or any(f in flags for f in BF16_FLAGS):
        return None
    return (
        "warning: --dtype bf16 on a CPU without bf16 instructions (no avx512_bf16 or amx_bf16): its batched "
        "matmuls are emulated and run slower than fp32's; --dtype fp32 or int8 is faster on this CPU"
    )


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process for reuse instead of returning it to the OS (glibc only).

    glibc serves every allocation above 32 MiB (the card's attention maps, logits chunks, the embedding's
    gradient) with a fresh mmap and unmaps it on free, so each training step page-faults hundreds of MB
    of zeroed pages back in, a large share of a CPU step (measured: docs/benchmarks.md, "What changed").
    With mmap off and trimming off, freed blocks are reused. The cost is that the resident size stays at
    its peak. Called by the `nanogpt` CLI; NANOGPT_MALLOC_TUNING=0 turns it off. Returns whether it was
    applied.
    """
    if not sys.platform.startswith("linux") or os.environ.get("NANOGPT_MALLOC_TUNING", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # <malloc.h>
    return all(
        mallopt(option, value) == 1
        for option, value in ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_top_pad, 64 << 20))  # C ints
    )


def set_threads(n: int | None) -> None:
    """torch's CPU threads (None keeps torch's choice); `--threads N` of every command."""
    if n is None:
        return
    if n <= 0:
        raise SettingError("threads", f"threads={n} must be a whole number > 0; leave it unset for all cores")
    torch.set_num_threads(n)
