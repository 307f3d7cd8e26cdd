"""The Apple MLX backend: the same network, checkpoints, sampling and training recipe as PyTorch.

It mirrors the PyTorch side module for module and name for name: `model.py` (`nanogpt.model.gpt`,
parameter for parameter), `kv_cache.py`, `generate.py` (sampling with an MLX KV cache), `evaluate.py`, and
`train/` (`nanogpt.train`: `loop.py` the trainer with an `mx.compile`d step, `optim.py`, `checkpoint.py` the
shared `config.json` + `model.safetensors` folder). No module imports it at its top: the code behind
`--backend mlx` (`commands/`, `bench/`; only layers above this one may) imports it inside the function that
needs it, so MLX stays optional. Importing it without MLX installed raises a one-line `UserError` saying how
to install it.

    from nanogpt.mlx import load_model, generate
    ids = list(generate(load_model("runs/demo"), [50256], 50, seed=1337))
"""

from __future__ import annotations

from nanogpt.errors import missing_extra

try:
    import mlx.core  # noqa: F401  (the check only; the modules import what they use)
except ImportError as e:
    raise missing_extra(f"the MLX backend needs MLX, which is not importable here ({e})", "mlx") from None

from nanogpt.mlx.generate import generate  # noqa: E402
from nanogpt.mlx.model import NanoGPTLMHeadModel  # noqa: E402
from nanogpt.mlx.train.checkpoint import load_model, save_model  # noqa: E402

# the trainer stays `nanogpt.mlx.train.loop.train`: a `train` here would hide the `nanogpt.mlx.train` package
__all__ = ["NanoGPTLMHeadModel", "load_model", "save_model", "generate"]
