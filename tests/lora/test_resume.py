"""A LoRA run killed (SIGKILL) past a checkpoint resumes with losses equal, bit for bit, to an uninterrupted
run's: the adapters, their AdamW moments, the RNG (LoRA dropout) and the data order all come back, and the
base is re-read from the recorded path."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import save_model
from tests.processes import kill_when
from tests.tiny import tiny_config
from tests.train.test_resume import checkpoint_step, child_env, losses

STEPS = 24
FLAGS = [
    *("--lora-rank", "4", "--lora-dropout", "0.1", "--lr-decay-iters", str(STEPS), "--eval-interval", "4"),
    *("--eval-iters", "1", "--log-interval", "1", "--batch-size", "2", "--learning-rate", "1e-2"),
    *("--warmup-iters", "2", "--threads", "1", "--no-progress"),
]


def cmd(data: Path, out: Path, base: Path, *extra: str) -> list[str]:
    train = ["train", "--data", str(data), "--out", str(out), "--init-from", str(base)]
    return [sys.executable, "-m", "nanogpt.cli", *train, *FLAGS, *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    return save_model(
        tmp_path_factory.mktemp("b") / "base", NanoGPTLMHeadModel(tiny_config(context_length=32))
    )


def test_lora_sigkill_then_resume_is_bit_identical(base, small_data, tmp_path):
    whole = subprocess.run(
        cmd(small_data, tmp_path / "whole", base, "--max-iters", str(STEPS)),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert whole.returncode == 0, whole.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        cmd(small_data, run, base, "--max-iters", "1000000"),
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def past_a_checkpoint() -> bool:
        saved = checkpoint_step(run)
        logged = max((s for s, _, _ in losses(run)), default=0) if (run / "log.jsonl").is_file() else 0
        return saved is not None and saved < logged <= STEPS

    try:
        kill_when(past_a_checkpoint, proc)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = checkpoint_step(run)
    resumed = subprocess.run(
        [sys.executable, "-m", "nanogpt.cli", "train", "--out", str(run), "--resume", "--max-iters", str(STEPS),
         "--threads", "1", "--no-progress"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {run} at step {saved} of {STEPS}" in resumed.stdout
    assert losses(run) == losses(tmp_path / "whole")  # ==: same adapters, moments, RNG and data order
