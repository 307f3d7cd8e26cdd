"""Two CPU processes through torchrun (gloo): DDP training runs, logs once, checkpoints, and resumes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

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


@pytest.mark.slow
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


def test_two_process_chat_step_weights_every_assistant_token_alike(tmp_path):
    """On chat data with accumulation, the logged first loss is the mean over the trained targets of all four
    micro-batches (2 ranks x 2 steps): the ranks agree on the step's target count before the backward."""
    import numpy as np
    import torch

    from nanogpt.data.prepare import prepare
    from nanogpt.data.shards import IGNORE, BatchSampler, TokenData
    from nanogpt.model.gpt import NanoGPTLMHeadModel
    from nanogpt.train.checkpoint import save_model
    from tests.data.test_chat import CHAT
    from tests.tiny import tiny_config

    data = tmp_path / "chat"
    prepare(str(CHAT), data, val_fraction=0.2, verbose=False)
    cfg = tiny_config(context_length=128)
    torch.manual_seed(0)
    base = save_model(tmp_path / "base", NanoGPTLMHeadModel(cfg).eval())
    run = tmp_path / "ddp"
    flags = ["--data", str(data), "--out", str(run), "--init-from", str(base), "--device", "cpu"]
    flags += ["--max-iters", "1", "--batch-size", "2", "--grad-accum-steps", "2", "--log-interval", "1"]
    proc = torchrun(*flags, "--eval-iters", "1", "--seed", "5", "--dropout", "0", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = read_log(run / "log.jsonl")[1]["loss"]

    model, total, count, means = load_model(base).eval(), 0.0, 0, []
    for rank in (0, 1):
        sampler = BatchSampler(TokenData(data).split("train"), 2, 128, 5, rank)
        for _ in range(2):
            x, y = sampler.next()
            with torch.no_grad():
                nll = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
            total, count = total + float(nll.sum()), count + int((y != IGNORE).sum())
            means.append(float(nll.sum()) / int((y != IGNORE).sum()))
    assert abs(logged - total / count) < 1e-5
    assert abs(np.mean(means) - total / count) > 1e-3  # the micro-batches differ: the weighting matters here
