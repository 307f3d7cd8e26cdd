"""Kill a real training process (SIGKILL) and resume it: the losses must equal an uninterrupted run's, bit for bit.

The kill comes from outside, as a crash or an OOM killer's would: the run to kill is started with no end of
its own (a far --max-iters; --lr-decay-iters pins the schedule to the uninterrupted run's, step for step)
and is killed once it has logged steps past a checkpoint; the resume then runs to the uninterrupted run's
last step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt.train.checkpoint import load_model, recover_dir
from nanogpt.train.plot import read_log
from tests.processes import kill_when
from tests.tiny import TINY_MODEL

# dropout 0.1: the resumed run must also restore the torch RNG to draw the same dropout masks
MODEL = {**TINY_MODEL, "context_length": 32, "dropout": 0.1}
STEPS = 40  # the uninterrupted run's; a kill lands on one of its 9 checkpoint intervals
FLAGS = [
    "--lr-decay-iters",
    str(STEPS),
    "--eval-interval",
    "4",
    "--eval-iters",
    "1",
    "--log-interval",
    "1",
    "--batch-size",
    "2",
    "--learning-rate",
    "1e-3",
    "--warmup-iters",
    "2",
    "--threads",
    "1",
    "--no-progress",
]


def train_cmd(data: Path, out: Path, config: Path, *extra: str) -> list[str]:
    train = ["train", "--data", str(data), "--out", str(out), "--config", str(config)]
    return [sys.executable, "-m", "nanogpt.cli", *train, *FLAGS, *extra]


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def run_train(data: Path, out: Path, config: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = train_cmd(data, out, config, *extra)
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)


def losses(run: Path) -> list[tuple[int, float | None, float | None]]:
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_log(run / "log.jsonl")]


def checkpoint_step(run: Path) -> int | None:
    """The step of `run`'s published checkpoint (last/), None while there is none."""
    try:
        return json.loads((run / "last" / "state.json").read_text())["step"]
    except (OSError, ValueError):
        return None


def past_a_checkpoint(run: Path) -> bool:
    """Steps are logged past the checkpoint (so a resume replays them), before the uninterrupted run's end."""
    saved = checkpoint_step(run)
    logged = max((r["step"] for r in read_log(run / "log.jsonl")), default=0)
    return saved is not None and saved < logged <= STEPS


def kill_past_a_checkpoint(data: Path, run: Path, config: Path) -> tuple[int, int]:
    """Start a run with no end of its own, SIGKILL it from outside once it is `past_a_checkpoint`; returns
    (its checkpoint's step, its last logged step)."""
    cmd = train_cmd(data, run, config, "--max-iters", "1000000")
    proc = subprocess.Popen(
        cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        kill_when(lambda: past_a_checkpoint(run), proc)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = checkpoint_step(run)
    assert saved is not None
    return saved, max(r["step"] for r in read_log(run / "log.jsonl"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_data):
    root = tmp_path_factory.mktemp("resume")
    config = root / "model.json"
    config.write_text(json.dumps(MODEL))
    proc = run_train(small_data, root / "uninterrupted", config, "--max-iters", str(STEPS))
    assert proc.returncode == 0, proc.stderr
    return root, config, losses(root / "uninterrupted")


def test_sigkill_mid_run_then_resume_is_bit_identical(setup, small_data):
    root, config, expected = setup
    run = root / "killed"
    saved, logged = kill_past_a_checkpoint(small_data, run, config)
    assert saved % 4 == 0 and saved < logged  # steps saved+1..logged will be replayed
    proc = run_train(small_data, run, config, "--resume", "--max-iters", str(STEPS))
    assert proc.returncode == 0, proc.stderr
    assert f"resumed {run} at step {saved} of {STEPS}" in proc.stdout
    got = losses(run)
    assert [s for s, _, _ in got] == list(range(STEPS + 1))  # no duplicated steps after the resume
    assert got == expected  # ==, not approx: same weights, moments, RNG and data order


def test_sigkill_while_writing_a_checkpoint_leaves_a_loadable_one(setup, small_data):
    """atomic_dir's windows: a kill while last.tmp/ is written, or between its two renames (last/ moved to
    last.old/, last.tmp/ not yet in), leaves a checkpoint to load and resume exactly.

    The kill is real; the moment inside a checkpoint write is too short to hit from outside, so the files
    such a kill leaves are made on top of it: a checkpoint torn in last.tmp/, then last/ moved away."""
    root, config, expected = setup
    run = root / "killed_in_checkpoint"
    saved, _ = kill_past_a_checkpoint(small_data, run, config)
    shutil.copytree(run / "last", run / "last.tmp")
    weights = run / "last.tmp" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # killed mid-file
    assert load_model(run / "last").config.dropout == 0.1  # the published checkpoint is whole
    os.replace(run / "last", run / "last.old")
    assert recover_dir(run / "last") == run / "last.old"
    load_model(run)
    proc = run_train(small_data, run, config, "--resume", "--max-iters", str(STEPS))
    assert proc.returncode == 0, proc.stderr
    assert f"resumed {run} at step {saved} of {STEPS}" in proc.stdout
    assert losses(run) == expected
    assert (run / "last").is_dir() and not (run / "last.old").exists() and not (run / "last.tmp").exists()
    assert json.loads((run / "last" / "state.json").read_text())["step"] == STEPS


def test_resume_defaults_to_the_runs_own_configs(setup, small_data):
    root, config, _ = setup
    run = root / "uninterrupted"
    cmd = [
        sys.executable,
        "-m",
        "nanogpt.cli",
        "train",
        "--out",
        str(run),
        "--resume",
        "--max-iters",
        str(STEPS + 1),
        "--threads",
        "1",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [r["step"] for r in read_log(run / "log.jsonl")][-2:] == [STEPS, STEPS + 1]
    saved = json.loads((run / "last" / "state.json").read_text())
    saved_cfg = json.loads((run / "train_config.json").read_text())
    assert saved["step"] == STEPS + 1
    assert saved_cfg["max_iters"] == STEPS + 1 and saved_cfg["batch_size"] == 2  # the rest came from the run
