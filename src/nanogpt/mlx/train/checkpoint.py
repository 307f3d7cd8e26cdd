"""MLX checkpoints in the shared format: a folder with `config.json` + `model.safetensors`.

The tensor names, shapes and dtypes are those `nanogpt.train.checkpoint` writes from PyTorch (a tied
`lm_head.weight` is not stored), so a checkpoint saved by either backend loads in the other. Folders
are written atomically with `nanogpt.train.checkpoint.atomic_dir`; reading goes through `resolve_checkpoint`
(a run folder's best/ then last/, or a checkpoint folder; `.old` after a crash).

A training checkpoint (`RUN/last/`) adds `state.safetensors` (AdamW moments and step counts, by parameter
name, under `mlx_optimizer.`) and `state.json` (`"backend": "mlx"`, counters, sampler state, configs):
see `save_train_state`. The optimizer layout differs from torch's, so only the MLX trainer resumes it.

    save_model("runs/mlx/last", model)
    model = load_model("runs/mlx")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from nanogpt.config import ModelConfig
from nanogpt.errors import UserError
from nanogpt.mlx.lora import adapter_state
from nanogpt.mlx.model import NanoGPTLMHeadModel
from nanogpt.model.lora import adapter_shapes
from nanogpt.train.adapters import ADAPTER_WEIGHTS, AdapterRecord, is_adapter_folder, write_record
from nanogpt.train.checkpoint import (
    CONFIG,
    STATE_JSON,
    STATE_TENSORS,
    TIED_KEY,
    WEIGHTS,
    atomic_dir,
    check_weights,
    resolve_checkpoint,
    write_json,
)
from nanogpt.train.checkpoint import load_weights as torch_load_weights

# same metadata as the PyTorch writer: the file is layout-identical to a torch export
METADATA = {"format": "pt", "library": "nanogpt"}
OPT_PREFIX = "mlx_optimizer."  # the optimizer arrays' names in state.safetensors
BACKEND = "mlx"  # state.json's "backend": which trainer may resume the checkpoint


# --- the model: config.json + model.safetensors ----------------------------------------------------------


def model_state(model: NanoGPTLMHeadModel) -> dict[str, mx.array]:
    """The weights to store, by their shared names (the tied head is never in the MLX tree)."""
    return dict(tree_flatten(model.parameters()))


def write_model_files(folder: Path, model: NanoGPTLMHeadModel, lora: AdapterRecord | None = None) -> None:
    """Write config.json + model.safetensors into an existing folder (no atomic swap).

    With `lora` (a LoRA run), the adapters alone + their record, as the PyTorch writer does."""
    model.config.save(folder / CONFIG)
    state, name = (
        (adapter_state(model), ADAPTER_WEIGHTS) if lora is not None else (model_state(model), WEIGHTS)
    )
    mx.eval(state)
    mx.save_safetensors(str(folder / name), state, metadata=METADATA)
    if lora is not None:
        write_record(folder, lora)


def save_model(dst: str | Path, model: NanoGPTLMHeadModel, lora: AdapterRecord | None = None) -> Path:
    """Write `model` as the checkpoint folder `dst`, atomically (the previous one stays until it is complete)."""
    with atomic_dir(dst) as tmp:
        write_model_files(tmp, model, lora)
    return Path(dst)


def load_weights(folder: Path) -> dict[str, mx.array]:
    """A checkpoint folder's model.safetensors as MLX arrays; a missing or corrupt file is one line.

    A LoRA checkpoint gives its base's weights with the adapters merged in (`train.checkpoint.load_weights`)."""
    if is_adapter_folder(folder):
        return {k: mx.array(v.numpy()) for k, v in torch_load_weights(folder).items()}
    f = folder / WEIGHTS
    if not f.is_file():
        raise UserError(f"{f} not found; the checkpoint is incomplete, use another one or train again")
    try:
        return mx.load(str(f))  # type: ignore[return-value]
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"{f} is corrupt or not a safetensors file ({e}); use another checkpoint") from None


def load_state_into(model: NanoGPTLMHeadModel, sd: dict[str, mx.array], source: str | Path) -> None:
    """Load weights with one-line errors naming the first missing, unexpected or mis-shaped tensor."""
    expected = {k: tuple(v.shape) for k, v in model_state(model).items()}
    if model.config.tie_embeddings:
        sd = {k: v for k, v in sd.items() if k != TIED_KEY}  # a writer that kept the tied copy is fine
    check_weights(expected, {k: tuple(v.shape) for k, v in sd.items()}, source)
    # training and the shared format are fp32; a bf16/fp16 file is upcast like torch's load_state_dict does
    model.update(tree_unflatten([(k, sd[k].astype(mx.float32)) for k in expected]))
    mx.eval(model.parameters())


def load_model(path: str | Path) -> NanoGPTLMHeadModel:
    """A checkpoint or run folder (written by either backend) as an MLX model in eval mode."""
    folder = resolve_checkpoint(path)
    model = NanoGPTLMHeadModel(ModelConfig.load(folder / CONFIG))
    load_state_into(model, load_weights(folder), folder / WEIGHTS)
    model.eval()
    return model


def load_adapters(folder: Path, cfg: ModelConfig, record: AdapterRecord) -> dict[str, mx.array]:
    """A LoRA checkpoint's adapter arrays, names and shapes checked (either backend wrote them)."""
    f = folder / ADAPTER_WEIGHTS
    try:
        sd: dict[str, mx.array] = mx.load(str(f))  # type: ignore[assignment]
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(
            f"{f} is missing, corrupt or not a safetensors file ({e}); use another checkpoint"
        ) from None
    check_weights(adapter_shapes(cfg, record.spec), {k: tuple(v.shape) for k, v in sd.items()}, f)
    return sd


# --- training state: optimizer arrays + state.json (no pickles) --------------------------------------------


def optimizer_arrays(opt: optim.Optimizer) -> dict[str, mx.array]:
    """The optimizer state as flat named arrays (moments m/v per parameter, step, learning rate)."""
    return {OPT_PREFIX + k: v for k, v in tree_flatten(opt.state)}


def load_optimizer_arrays(opt: optim.Optimizer, arrays: dict[str, mx.array]) -> None:
    """Inverse of `optimizer_arrays`: the state is replaced exactly (same dtypes, same values)."""
    items = [(k[len(OPT_PREFIX) :], v) for k, v in arrays.items() if k.startswith(OPT_PREFIX)]
    saved = tree_unflatten(items)
    current = dict(tree_flatten(opt.state))
    if set(dict(items)) != set(current):
        raise UserError(
            "the saved MLX optimizer state does not fit this model; resume with the run's own config"
        )
    opt.state = saved


def save_train_state(folder: Path, opt: optim.Optimizer, info: dict[str, Any]) -> None:
    """state.safetensors (the optimizer arrays) + state.json (`"backend": "mlx"` first, then `info`)."""
    arrays = optimizer_arrays(opt)
    mx.eval(arrays)
    mx.save_safetensors(str(folder / STATE_TENSORS), arrays, metadata={"format": "mlx", "library": "nanogpt"})
    write_json(folder / STATE_JSON, {"backend": BACKEND, **info})


def load_train_state(folder: Path, opt: optim.Optimizer) -> dict[str, Any]:
    """Load the optimizer state into `opt`; return state.json's contents."""
    info = json.loads((folder / STATE_JSON).read_text())
    if info.get("backend") != BACKEND:
        raise UserError(
            f"{folder} was written by the PyTorch trainer; resume it with the torch backend "
            "(or start an MLX run from its weights with init_from)"
        )
    try:
        arrays = mx.load(str(folder / STATE_TENSORS))
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(
            f"training state in {folder} is corrupt ({e}); resume from another checkpoint"
        ) from None
    load_optimizer_arrays(opt, arrays)  # type: ignore[arg-type]
    return info
