"""bf16 on a CPU that emulates it: the flags that decide, and the one-line warning `serve` prints."""

from __future__ import annotations

import platform
import sys

import torch

from nanogpt.kernels.device import cpu_flags, emulated_bf16_warning

CPU = torch.device("cpu")


def test_the_warning_names_the_missing_instructions_and_the_faster_dtypes():
    line = emulated_bf16_warning(CPU, "bf16", {"sse2", "avx", "avx2", "fma"})  # an AVX2-only CPU
    assert line is not None and "\n" not in line
    assert "avx512_bf16" in line and "amx_bf16" in line and "--dtype fp32 or int8" in line


def test_no_warning_where_bf16_is_native_unknown_or_not_asked():
    assert emulated_bf16_warning(CPU, "bf16", {"avx2", "avx512f", "avx512_bf16"}) is None
    assert emulated_bf16_warning(CPU, "bf16", {"avx2", "amx_bf16", "amx_tile"}) is None
    assert emulated_bf16_warning(CPU, "bf16", None) is None  # flags unknown (not x86-64 Linux)
    assert (
        emulated_bf16_warning(CPU, "fp32", {"avx2"}) is None
        and emulated_bf16_warning(CPU, "int8", {"avx2"}) is None
    )
    assert emulated_bf16_warning(torch.device("meta"), "bf16", {"avx2"}) is None  # only a CPU is warned about


def test_cpu_flags_reads_this_machine():
    flags = cpu_flags()
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert flags is not None and "sse2" in flags  # every x86-64 CPU has SSE2
    else:
        assert flags is None
