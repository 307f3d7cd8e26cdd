"""Kill a real training process (SIGKILL) and resume it: the losses must equal an uninterrupted run's, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt.train.checkpoint import load_model, recover_dir
from nanogpt.train.plot import read_log
from tests.tiny import TINY_MODEL

# dropout 0.1: the resumed run must also restore the torch RNG to draw the same dropout masks
MODEL = {**TINY_MODEL, "context_length": 32, "dropout": 0.1}
FLAGS = [
    "--max-iters",
    "12",
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


def run_train(data: Path, out: Path, config: Path, *extra: str, kill_at: str | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if kill_at:
        env["NANOGPT_TEST_KILL"] = kill_at
    cmd = [
        sys.executable,
        "-m",
        "nanogpt.cli",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--config",
        str(config),
        *FLAGS,
        *extra,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def losses(run: Path) -> list[tuple[int, float | None, float | None]]:
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_log(run / "log.jsonl")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_data):
    root = tmp_path_factory.mktemp("resume")
    config = root / "model.json"
    config.write_text(json.dumps(MODEL))
    proc = run_train(small_data, root / "uninterrupted", config)
    assert proc.returncode == 0, proc.stderr
    return root, config, losses(root / "uninterrupted")


def test_sigkill_mid_run_then_resume_is_bit_identical(setup, small_data):
    root, config, expected = setup
    run = root / "killed"
    proc = run_train(small_data, run, config, kill_at="step:6")
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 4
    assert max(r["step"] for r in read_log(run / "log.jsonl")) == 6  # steps 5, 6 will be replayed
    proc = run_train(small_data, run, config, "--resume")
    assert proc.returncode == 0, proc.stderr
    got = losses(run)
    assert [s for s, _, _ in got] == list(range(13))  # no duplicated steps after the resume
    assert got == expected  # ==, not approx: same weights, moments, RNG and data order


def test_sigkill_while_writing_a_checkpoint_leaves_a_loadable_one(setup, small_data):
    root, config, expected = setup
    run = root / "killed_in_checkpoint"
    proc = run_train(small_data, run, config, kill_at="checkpoint:8")
    assert proc.returncode == -signal.SIGKILL
    assert (run / "last.tmp" / "state.json").is_file()  # the new one was written, not yet renamed
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 4
    load_model(run / "last")
    # the other window: killed between atomic_dir's two renames (last/ moved to last.old/, last.tmp not yet in)
    os.replace(run / "last", run / "last.old")
    assert recover_dir(run / "last") == run / "last.old"
    load_model(run)
    proc = run_train(small_data, run, config, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert losses(run) == expected
    assert (run / "last").is_dir() and not (run / "last.old").exists() and not (run / "last.tmp").exists()
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 12


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
        "13",
        "--threads",
        "1",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [r["step"] for r in read_log(run / "log.jsonl")][-2:] == [12, 13]
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["max_iters"] == 13 and saved["batch_size"] == 2  # the rest came from the run
