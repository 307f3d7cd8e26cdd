"""MLX checkpoints in the shared format: a folder with `config.json` + `model.safetensors`.

The tensor names, shapes and dtypes are those `nanogpt.train.checkpoint` writes from PyTorch (a tied
`lm_head.weight` is not stored), so a checkpoint saved by either backend loads in the other. Folders
are written atomically with `nanogpt.train.checkpoint.atomic_dir`; reading goes through `resolve_checkpoint`
(a run folder's best/ then last/, or a checkpoint folder; `.old` after a crash).

    save_mlx_model("runs/mlx/last", model)
    model = load_mlx_model("runs/mlx")
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from nanogpt.config import ModelConfig
from nanogpt.errors import UserError
from nanogpt.mlx.model import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import CONFIG, TIED_KEY, WEIGHTS, atomic_dir, check_weights, resolve_checkpoint

# same metadata as the PyTorch writer: the file is layout-identical to a torch export
METADATA = {"format": "pt", "library": "nanogpt"}


def mlx_model_state(model: NanoGPTLMHeadModel) -> dict[str, mx.array]:
    """The weights to store, by their shared names (the tied head is never in the MLX tree)."""
    return dict(tree_flatten(model.parameters()))


def write_mlx_model_files(folder: Path, model: NanoGPTLMHeadModel) -> None:
    """Write config.json + model.safetensors into an existing folder (no atomic swap)."""
    model.config.save(folder / CONFIG)
    state = mlx_model_state(model)
    mx.eval(state)
    mx.save_safetensors(str(folder / WEIGHTS), state, metadata=METADATA)


def save_mlx_model(dst: str | Path, model: NanoGPTLMHeadModel) -> Path:
    with atomic_dir(dst) as tmp:
        write_mlx_model_files(tmp, model)
    return Path(dst)


def load_mlx_weights(folder: Path) -> dict[str, mx.array]:
    f = folder / WEIGHTS
    if not f.is_file():
        raise UserError(f"{f} not found; the checkpoint is incomplete, use another one or train again")
    try:
        return mx.load(str(f))  # type: ignore[return-value]
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"{f} is corrupt or not a safetensors file ({e}); use another checkpoint") from None


def load_mlx_state_into(model: NanoGPTLMHeadModel, sd: dict[str, mx.array], source: str | Path) -> None:
    """Load weights with one-line errors naming the first missing, unexpected or mis-shaped tensor."""
    expected = {k: tuple(v.shape) for k, v in mlx_model_state(model).items()}
    if model.config.tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != TIED_KEY}  # a writer that kept the tied copy is fine
    check_weights(expected, {k: tuple(v.shape) for k, v in sd.items()}, source)
    # training and the shared format are fp32; a bf16/fp16 file is upcast like torch's load_state_dict does
    model.update(tree_unflatten([(k, sd[k].astype(mx.float32)) for k in expected]))
    mx.eval(model.parameters())


def load_mlx_model(path: str | Path) -> NanoGPTLMHeadModel:
    """A checkpoint or run folder (written by either backend) as an MLX model in eval mode."""
    folder = resolve_checkpoint(path)
    model = NanoGPTLMHeadModel(ModelConfig.load(folder / CONFIG))
    load_mlx_state_into(model, load_mlx_weights(folder), folder / WEIGHTS)
    model.eval()
    return model
