"""The Apple MLX backend: the same network, checkpoints, sampling and training recipe as PyTorch.

`model.py` mirrors `nanogpt.model.gpt` parameter for parameter, `checkpoint.py` reads and writes the shared
`config.json` + `model.safetensors` folder, `generate.py` samples with an MLX KV cache, `train.py` is the
trainer with an `mx.compile`d step. No module imports it at its top: the code behind `--backend mlx`
(`commands/`, `bench/`; only layers above this one may) imports it inside the function that needs it, so
MLX stays optional. Importing it without MLX installed raises a one-line `UserError` saying how to install it.

    from nanogpt.mlx import load_mlx_model, generate
    ids = list(generate(load_mlx_model("runs/demo"), [50256], 50, seed=1337))
"""

from __future__ import annotations

from nanogpt.errors import missing_extra

try:
    import mlx.core  # noqa: F401  (the check only; the modules import what they use)
except ImportError as e:
    raise missing_extra(f"the MLX backend needs MLX, which is not importable here ({e})", "mlx") from None

from nanogpt.mlx.checkpoint import load_mlx_model, save_mlx_model  # noqa: E402
from nanogpt.mlx.generate import generate  # noqa: E402
from nanogpt.mlx.model import NanoGPTLMHeadModel  # noqa: E402
from nanogpt.mlx.train import train_mlx  # noqa: E402

__all__ = ["NanoGPTLMHeadModel", "load_mlx_model", "save_mlx_model", "generate", "train_mlx"]
