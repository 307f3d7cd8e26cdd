"""Fixtures of the LoRA tests: a tiny base checkpoint and a short LoRA run on it (PyTorch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import save_model
from nanogpt.train.loop import train
from tests.tiny import quick_train_config, tiny_config

RANK = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny seeded checkpoint: the frozen base of every LoRA run here."""
    torch.manual_seed(3)
    return save_model(tmp_path_factory.mktemp("base") / "base", NanoGPTLMHeadModel(tiny_config()))


@pytest.fixture(scope="module")
def lora_run(base, small_data, tmp_path_factory) -> Path:
    """8 LoRA steps (rank 4, lr high enough that B moves visibly) on `base`."""
    torch.set_num_threads(1)
    cfg = quick_train_config(lora_rank=RANK, learning_rate=1e-2, weight_decay=0.0)
    out = tmp_path_factory.mktemp("lora") / "run"
    train(tiny_config(), cfg, small_data, out, init_from=str(base), progress=False)
    return out
