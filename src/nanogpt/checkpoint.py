"""Checkpoints: a folder with `config.json` (the ModelConfig) and `model.safetensors`.

No pickles: weights go through safetensors only. A tied `lm_head.weight` is stored once (as
`transformer.token_embedding.weight`) and re-tied on load; the same tensor names serve the MLX backend.
Folders are written atomically: everything goes to `<dst>.tmp`, then replaces `<dst>` by renames, and
the previous checkpoint stays on disk (as `<dst>.old`) until the new one is complete.

    save_model("runs/demo/last", model)
    model = load_model("runs/demo")  # a run folder (best/ or last/) or a checkpoint folder
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanogpt.config import ModelConfig
from nanogpt.errors import UserError
from nanogpt.model import NanoGPTLMHeadModel

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TIED_KEY = "lm_head.weight"


@contextlib.contextmanager
def atomic_dir(dst: str | Path) -> Iterator[Path]:
    """Yield a scratch folder; on success it replaces `dst`. A crash at any point leaves `dst` or `dst.old`."""
    dst = Path(dst)
    tmp, old = dst.with_name(dst.name + ".tmp"), dst.with_name(dst.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: str | Path) -> Path:
    """The folder to read: `path`, or `path.old` if a crash struck between the two renames of atomic_dir."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        return old
    return path


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights to store: unwrapped from DDP/compile, tied head dropped, contiguous."""
    model = unwrap(model)
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop(TIED_KEY, None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def unwrap(model: torch.nn.Module) -> NanoGPTLMHeadModel:
    """The NanoGPTLMHeadModel inside a DistributedDataParallel and/or torch.compile wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model  # type: ignore[return-value]


def write_model_files(folder: Path, model: torch.nn.Module) -> None:
    """Write config.json + model.safetensors into an existing folder (no atomic swap)."""
    m = unwrap(model)
    m.config.save(folder / CONFIG)
    save_file(model_state(m), str(folder / WEIGHTS), metadata={"format": "pt", "library": "nanogpt"})


def save_model(dst: str | Path, model: torch.nn.Module) -> Path:
    with atomic_dir(dst) as tmp:
        write_model_files(tmp, model)
    return Path(dst)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a path: the folder itself, or a run folder's `best/` then `last/`."""
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"checkpoint {p} not found; pass a run folder or a checkpoint folder holding {CONFIG} and {WEIGHTS}"
        )
    if (recover_dir(p) / CONFIG).is_file():
        return recover_dir(p)
    for sub in ("best", "last"):
        if (recover_dir(p / sub) / CONFIG).is_file():
            return recover_dir(p / sub)
    raise UserError(
        f"{p} holds no checkpoint ({CONFIG} + {WEIGHTS}, or best/ or last/ with them); train one with `nanogpt train`"
    )


def load_config_of(path: str | Path) -> ModelConfig:
    return ModelConfig.load(resolve_checkpoint(path) / CONFIG)


def load_weights(folder: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    f = folder / WEIGHTS
    if not f.is_file():
        raise UserError(f"{f} not found; the checkpoint is incomplete, use another one or train again")
    try:
        return load_file(str(f), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{f} is corrupt or not a safetensors file ({e}); use another checkpoint") from None


def load_state_into(model: NanoGPTLMHeadModel, sd: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load weights with one-line errors naming the first missing, unexpected or mis-shaped tensor."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop(TIED_KEY)
        sd = {k: v for k, v in sd.items() if k != TIED_KEY}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        what = f"is missing {missing[0]!r}" if missing else f"has unexpected {unexpected[0]!r}"
        raise UserError(
            f"weights in {source} do not match config.json: the file {what}; the checkpoint is mismatched"
        )
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise UserError(
                f"weights in {source} do not match config.json: {k} has shape {tuple(sd[k].shape)}, "
                f"config expects {tuple(shape)}; the checkpoint is mismatched"
            )
    model.load_state_dict(sd, strict=False)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> NanoGPTLMHeadModel:
    folder = resolve_checkpoint(path)
    cfg = ModelConfig.load(folder / CONFIG)
    model = NanoGPTLMHeadModel(cfg)
    load_state_into(model, load_weights(folder), folder / WEIGHTS)
    return model.to(device).eval()


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
