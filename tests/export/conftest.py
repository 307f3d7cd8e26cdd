"""Fixtures of the export tests: one tiny checkpoint exported in both formats, shared by the test modules.

def test_x(tiny_exports): AutoModelForCausalLM.from_pretrained(tiny_exports["remote-code"], trust_remote_code=True)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import save_model
from tests.tiny import tiny_config


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory) -> dict[str, Path]:
    """The tiny model (128-token context, seed 0) as a checkpoint and as an export per format:
    {"ckpt": checkpoint folder, "remote-code": folder, "gpt2": folder}. Read-only: copy before changing."""
    pytest.importorskip("tokenizers")
    from nanogpt.export import hf

    root = tmp_path_factory.mktemp("tiny_exports")
    torch.manual_seed(0)
    save_model(root / "ckpt", NanoGPTLMHeadModel(tiny_config(context_length=128)).eval())
    return {"ckpt": root / "ckpt"} | {
        fmt: hf.export(root / "ckpt", root / fmt, fmt).out for fmt in hf.FORMATS
    }
