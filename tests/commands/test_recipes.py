"""Each preset trains with a recipe for its size, flag by flag overridable and printed as the run starts;
the demo says when a busy machine cut its run short, and what an idle one reaches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanogpt.cli import main
from nanogpt.commands.demo import IDLE, REFERENCE_CPU, MachineLoad, busy_note, demo_train_config
from nanogpt.config import RECIPES, TrainConfig, recipe, warmup_for

QUICK = ["--batch-size", "2", "--eval-iters", "1", "--threads", "1", "--no-progress", "--max-time", "0"]


def saved_train_config(run: Path) -> dict:
    return json.loads((run / "train_config.json").read_text())


def test_tiny_trains_with_the_demos_recipe_and_prints_it(small_data, tmp_path, capsys):
    run = tmp_path / "tiny"
    argv = ["train", "--data", str(small_data), "--out", str(run), "--preset", "tiny", "--max-iters", "20"]
    assert main([*argv, "--threads", "1", "--no-progress", "--max-time", "0"]) == 0
    saved = saved_train_config(run)
    assert saved["optimizer"] == "muon" and saved["learning_rate"] == 8e-3 and saved["batch_size"] == 8
    assert saved["warmup_iters"] == warmup_for(20) == 2  # follows --max-iters: not the card's 500
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("training: "))
    assert "batch 8 x 128" in line and "muon lr 0.008" in line and "warmup 2" in line
    assert "preset 'tiny'" in line and "your flags" in line


def test_a_flag_overrides_one_field_of_the_recipe(small_data, tmp_path):
    run = tmp_path / "tiny"
    argv = ["train", "--data", str(small_data), "--out", str(run), "--preset", "tiny", *QUICK]
    assert main([*argv, "--learning-rate", "1e-3", "--warmup-iters", "7"]) == 0
    saved = saved_train_config(run)
    assert saved["learning_rate"] == 1e-3 and saved["warmup_iters"] == 7
    assert saved["optimizer"] == "muon" and saved["max_iters"] == RECIPES["tiny"]["max_iters"]
    assert saved["batch_size"] == 2  # QUICK's


def test_card_preset_keeps_the_cards_recipe():
    assert recipe("card") == TrainConfig()
    assert recipe("card", max_iters=100).warmup_iters == 500  # the card's numbers are not rescaled
    assert recipe("tiny", max_iters=100).warmup_iters == 10
    assert recipe("tiny", max_iters=100, warmup_iters=50).warmup_iters == 50


def test_demo_uses_the_presets_recipe():
    cfg = demo_train_config(1.0, 8, seed=0, preset_name="tiny")
    for key in ("batch_size", "learning_rate", "min_lr", "optimizer", "eval_iters"):
        assert getattr(cfg, key) == RECIPES["tiny"][key], key
    assert cfg.max_iters < RECIPES["tiny"]["max_iters"] and cfg.max_time == 480  # sized to the budget


def test_busy_machine_note_names_the_load_the_step_times_and_the_fix():
    machine = MachineLoad(load=5.3, cores=2, s_per_iter=3.45, idle_s_per_iter=IDLE["tiny"][0])
    assert machine.busy
    note = busy_note(machine, "tiny", 8, steps=61, planned=86, ppl=432.6)
    assert note is not None
    reference = f"{IDLE['tiny'][0]:.2f}"
    for part in ("busy", "load average 5.3 on 2 cores", "3.45 s", reference, "step 61 of 86", "432.6"):
        assert part in note, part
    assert IDLE["tiny"][1] in note and "--minutes" in note and "quieter machine" in note
    assert "\n" not in note


def test_no_note_on_an_idle_machine_that_finished_its_plan():
    machine = MachineLoad(
        load=0.4, cores=2, s_per_iter=1.03 * IDLE["tiny"][0], idle_s_per_iter=IDLE["tiny"][0]
    )
    assert not machine.busy and busy_note(machine, "tiny", 8, steps=1250, planned=1250) is None


def test_a_high_load_is_busy_and_a_slow_step_alone_is_a_slower_cpu():
    assert MachineLoad(load=3.5, cores=2, s_per_iter=0.3, idle_s_per_iter=0.3).busy
    # the run's own two threads on an idle 2-core machine: a load of ~2 as training ends, not a busy machine
    assert not MachineLoad(load=2.02, cores=2, s_per_iter=0.3, idle_s_per_iter=0.3).busy
    quiet_but_slow = MachineLoad(load=0.5, cores=2, s_per_iter=0.9, idle_s_per_iter=0.3)
    assert quiet_but_slow.slow and not quiet_but_slow.busy
    note = busy_note(quiet_but_slow, "tiny", 8, steps=500, planned=500, ppl=180.0)
    assert note is not None  # the plan finished, but fewer steps fit than on the reference CPU
    assert "slower than the reference CPU" in note and "busy" not in note and "quieter machine" not in note
    assert REFERENCE_CPU in note and IDLE["tiny"][1] in note and "180.0" in note and "--minutes" in note


def test_tiny_on_mlx_trains_its_recipe_with_adamw(small_data, tmp_path, capsys):
    pytest.importorskip("mlx.core")
    run = tmp_path / "tiny_mlx"
    argv = ["train", "--data", str(small_data), "--out", str(run), "--preset", "tiny", "--backend", "mlx"]
    assert main([*argv, *QUICK]) == 0
    saved = saved_train_config(run)
    assert saved["optimizer"] == "adamw" and saved["learning_rate"] == 8e-3
    assert "AdamW in place of Muon" in capsys.readouterr().out
