"""The distillation memory row: peak memory of a few distillation steps against plain training, same batch.

`nanogpt bench --distill-memory --preset card` prepares a small slice of the builtin corpus, saves a teacher
of the same size (random weights: memory does not depend on their values), then runs `nanogpt train` and
`nanogpt distill` for a few steps each, as separate processes, and reads each one's peak resident memory.
The commands run as processes (bench never imports distill): what is measured is exactly what a user runs.
The target is a distillation peak within 1.3x of training's (docs/benchmarks.md).

    rows = distill_memory(preset("card"), batch=12, seq=512, steps=3, threads=2)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from nanogpt.config import ModelConfig
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import save_model

TARGET = 1.3  # distillation's peak over plain training's, at the same batch
# runs a command as its only child and prints that child's peak RSS: a child's peak starts at its parent's
# (kept across exec), so the command must not be a direct child of the large bench process
PEAK = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print('PEAK_RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * "
    "(1 if sys.platform == 'darwin' else 1024), rc)"
)


def peak_rss(argv: list[str]) -> int:
    """Run `python -m nanogpt ARGV` and return its peak resident memory in bytes."""
    cmd = [sys.executable, "-c", PEAK, sys.executable, "-m", "nanogpt", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PEAK_RSS")), None)
    if line is None or line.split()[2] != "0":
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"nanogpt {argv[0]} failed while measuring memory: {tail}")
    return int(line.split()[1])


def distill_memory(
    cfg: ModelConfig,
    batch: int,
    seq: int,
    steps: int = 3,
    threads: int | None = None,
    backend: str = "torch",
) -> dict[str, Any]:
    """Peak RSS of `steps` training steps and of `steps` distillation steps (a same-size local teacher), both
    run by `backend` (MLX on a Mac keeps its arrays in unified memory, which RSS counts too)."""
    cfg = replace(cfg, context_length=seq) if seq != cfg.context_length else cfg
    with tempfile.TemporaryDirectory(prefix="nanogpt-distill-mem-") as tmp:
        work = Path(tmp)
        data = work / "data"
        tokens = max(200_000, 40 * batch * (seq + 1))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "nanogpt",
                "prepare",
                "--out",
                str(data),
                "--max-tokens",
                str(tokens),
                "--quiet",
            ],
            check=True,
            capture_output=True,
        )
        (work / "model.json").write_text(json.dumps(cfg.to_dict()))
        torch.manual_seed(1)
        save_model(work / "teacher", NanoGPTLMHeadModel(cfg))
        common = [
            "--data",
            str(data),
            "--max-iters",
            str(steps),
            "--batch-size",
            str(batch),
            "--eval-iters",
            "1",
        ]
        common += ["--eval-interval", str(10 * steps), "--warmup-iters", "1", "--no-progress"]
        common += ["--threads", str(threads)] if threads else []
        common += ["--backend", backend]
        t0 = time.perf_counter()
        train = peak_rss(["train", "--config", str(work / "model.json"), "--out", str(work / "run"), *common])
        t1 = time.perf_counter()
        distill = peak_rss(
            ["distill", "--student", str(work / "teacher"), "--teacher", str(work / "teacher"), "--out",
             str(work / "kd"), *common]
        )  # fmt: skip
        t2 = time.perf_counter()
    ratio = distill / train
    return {
        "config": cfg.to_dict(),
        "backend": backend,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "train_peak_bytes": train,
        "distill_peak_bytes": distill,
        "ratio": ratio,
        "target": TARGET,
        "met": ratio <= TARGET,
        "seconds": {"train": t1 - t0, "distill": t2 - t1},
        "method": f"peak RSS (getrusage of the command's process), {backend}, fp32, a same-size local teacher",
    }


def markdown(result: dict[str, Any]) -> str:
    """The row as bench.md prints it."""
    gib = 1 << 30
    return (
        "| measurement | plain train | distill (local teacher) | distill / train | target |\n"
        "|---|---|---|---|---|\n"
        f"| peak memory, {result.get('backend', 'torch')}, {result['steps']} steps at "
        f"{result['batch']} x {result['seq']} | "
        f"{result['train_peak_bytes'] / gib:.2f} GiB | {result['distill_peak_bytes'] / gib:.2f} GiB | "
        f"{result['ratio']:.2f}x | <= {result['target']}x ({'met' if result['met'] else 'not met'}) |\n"
    )
