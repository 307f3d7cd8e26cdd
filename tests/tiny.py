"""The tiny model and the quick training recipe the tests share (STYLE habit 11: 2 layers, width 32).

from tests.tiny import tiny_config
cfg = tiny_config(context_length=32)
"""

from __future__ import annotations

from typing import Any

from nanogpt.config import ModelConfig, TrainConfig

# as a `--config` JSON file holds it; tests that write one use {**TINY_MODEL, ...}
TINY_MODEL: dict[str, Any] = {
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "d_ff": 128,
    "context_length": 64,
    "dropout": 0.0,
}


def tiny_config(**changes: Any) -> ModelConfig:
    """The tiny model, with `changes` (e.g. a shorter context_length) applied."""
    return ModelConfig(**{**TINY_MODEL, **changes})


def quick_train_config(**changes: Any) -> TrainConfig:
    """A few CPU steps at batch 2, evaluating and logging often enough to see every code path."""
    base: dict[str, Any] = {
        "batch_size": 2,
        "max_iters": 8,
        "eval_interval": 4,
        "eval_iters": 1,
        "log_interval": 1,
        "warmup_iters": 2,
        "learning_rate": 1e-3,
        "min_lr": 1e-4,
        "device": "cpu",
    }
    return TrainConfig(**{**base, **changes})
