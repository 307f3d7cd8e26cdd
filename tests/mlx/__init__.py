"""The MLX backend against PyTorch, file for file as `nanogpt.mlx`: `test_model.py` (logits, names, KV cache),
`test_generate.py`, `test_checkpoint.py` (both ways, optimizer state), `test_train.py` (the optimizer math,
20 steps against torch, exact resume) and `test_cli.py` (`--backend mlx` through the real commands).

MLX's Linux CPU build is slow (reference BLAS), so inputs are short and batches small; parity is checked at
the tiny config and, for logits, at the card's exact config. Each module skips itself where MLX is not
importable, so the helpers below import it only when called.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanogpt.config import ModelConfig
from nanogpt.model.gpt import NanoGPTLMHeadModel as TorchGPT
from nanogpt.train.checkpoint import save_model


def torch_and_mlx(cfg: ModelConfig, tmp_path: Path, seed: int = 0):
    """A random-init torch model and the same weights in MLX, through the shared checkpoint format."""
    from nanogpt.mlx.train.checkpoint import load_model

    torch.manual_seed(seed)
    tm = TorchGPT(cfg).eval()
    save_model(tmp_path / "torch_ckpt", tm)
    return tm, load_model(tmp_path / "torch_ckpt")
