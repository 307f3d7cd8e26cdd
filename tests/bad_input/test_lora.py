"""Bad input around LoRA: each refused in one line naming the problem and the fix, nothing written."""

from __future__ import annotations

import shutil

import pytest
import torch

from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import save_model
from tests.bad_input import refuse
from tests.tiny import tiny_config

TRAIN = [
    "--max-iters",
    "2",
    "--eval-interval",
    "1",
    "--eval-iters",
    "1",
    "--batch-size",
    "2",
    "--no-progress",
]


@pytest.fixture
def base(tmp_path):
    torch.manual_seed(0)
    return save_model(tmp_path / "base", NanoGPTLMHeadModel(tiny_config()))


def test_lora_without_init_from(capsys, small_data, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--data", str(small_data), "--out", str(out), "--preset", "tiny", "--lora-rank", "8"]
    refuse(capsys, argv, names="--lora-rank", fix="--init-from")
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "names", "fix"),
    [
        (["--lora-targets", "qkv_proj,lm_head"], "lm_head", "qkv_proj,out_proj,fc1,fc2"),
        (["--lora-rank", "-1"], "lora_rank", "--lora-rank"),
        (["--lora-alpha", "0"], "lora_alpha", "--lora-alpha"),
        (["--lora-dropout", "1"], "lora_dropout", "--lora-dropout"),
        (["--optimizer", "muon"], "muon", "adamw"),
    ],
)
def test_bad_lora_settings(capsys, small_data, base, tmp_path, flags, names, fix):
    out = tmp_path / "run"
    argv = ["train", "--data", str(small_data), "--out", str(out), "--init-from", str(base), *TRAIN]
    lora = [] if "--lora-rank" in flags else ["--lora-rank", "4"]
    refuse(capsys, [*argv, *lora, *flags], names=names, fix=fix, untouched=[base])
    assert not out.exists()


@pytest.fixture
def lora_run(small_data, base, tmp_path):
    out = tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(small_data),
        "--out",
        str(out),
        "--init-from",
        str(base),
        "--lora-rank",
        "2",
    ]
    from nanogpt import cli

    assert cli.main([*argv, *TRAIN, "--threads", "1"]) == 0
    return out


@pytest.mark.parametrize("command", ["eval", "export", "resume"])
def test_moved_base_is_refused_by_every_loader(capsys, lora_run, base, small_data, tmp_path, command):
    shutil.move(str(base), tmp_path / "elsewhere")
    argv = {
        "eval": ["eval", "--model", str(lora_run), "--data", str(small_data)],
        "export": ["export", "--model", str(lora_run), "--out", str(tmp_path / "hf")],
        "resume": ["train", "--out", str(lora_run), "--resume", "--max-iters", "3", "--no-progress"],
    }[command]
    refuse(capsys, argv, names=[str(base), "moved"], fix="base_checkpoint", untouched=[lora_run])


def test_changed_base_is_refused(capsys, lora_run, base, small_data):
    torch.manual_seed(1)
    save_model(base, NanoGPTLMHeadModel(tiny_config()))
    refuse(
        capsys,
        ["eval", "--model", str(lora_run), "--data", str(small_data)],
        names=[str(base), "changed"],
        fix="train the adapters again",
    )


def test_adapter_only_of_a_full_run(capsys, base, tmp_path):
    argv = ["export", "--model", str(base), "--out", str(tmp_path / "a"), "--adapter-only"]
    refuse(capsys, argv, names="not a LoRA run", fix="drop --adapter-only", untouched=[base])


def test_adapter_only_for_gguf(capsys, lora_run, tmp_path):
    argv = ["export", "--model", str(lora_run), "--out", str(tmp_path / "a.gguf"), "--format", "gguf"]
    refuse(capsys, [*argv, "--adapter-only"], names="gguf", fix="drop it")
