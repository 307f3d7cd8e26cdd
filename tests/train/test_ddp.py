"""Two CPU processes through torchrun (gloo): DDP training runs, logs once, checkpoints, and resumes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from nanogpt.train.checkpoint import load_model
from nanogpt.train.plot import read_log
from tests.tiny import TINY_MODEL

MODEL = {**TINY_MODEL, "context_length": 32}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "nanogpt.cli",
        "train",
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_gloo_run_and_resume(small_data, tmp_path):
    config = tmp_path / "model.json"
    config.write_text(json.dumps(MODEL))
    run = tmp_path / "ddp"
    common = [
        "--data",
        str(small_data),
        "--out",
        str(run),
        "--config",
        str(config),
        "--device",
        "cpu",
        "--eval-interval",
        "2",
        "--eval-iters",
        "1",
        "--log-interval",
        "1",
        "--batch-size",
        "2",
        "--warmup-iters",
        "1",
        "--no-progress",
    ]
    proc = torchrun(*common, "--max-iters", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_log(run / "log.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]  # rank 0 alone writes the log
    assert all(math.isfinite(r["loss"]) for r in records[1:])
    assert records[1]["tokens"] == 2 * 2 * 32  # both processes' tokens
    state = json.loads((run / "last" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert state["ranks"][0]["sampler"] != state["ranks"][1]["sampler"]  # independent data streams
    load_model(run)
    proc = torchrun(*common, "--max-iters", "6", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_log(run / "log.jsonl")] == list(range(7))
