"""Checkpoints: a folder with `config.json` (the ModelConfig) and `model.safetensors`.

A training checkpoint (`RUN/last/`) adds `state.safetensors` (optimizer moments, RNG states as uint8
tensors) and `state.json` (step, counters, data sampler state, configs): see `save_train_state`.

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
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanogpt.config import ModelConfig, read_json
from nanogpt.errors import UserError, write_fix
from nanogpt.folders import STATE_JSON, RunFolder, recover_dir
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.model.lora import adapter_shapes, adapter_state, merge_state
from nanogpt.train.adapters import (
    ADAPTER_WEIGHTS,
    AdapterRecord,
    check_base,
    is_adapter_folder,
    load_adapter_file,
    read_record,
    read_tensors,
    write_record,
)
from nanogpt.train.optim import TrainOptimizer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TIED_KEY = "lm_head.weight"


@contextlib.contextmanager
def atomic_dir(dst: str | Path) -> Iterator[Path]:
    """Yield a scratch folder; on success it replaces `dst`. A crash at any point leaves `dst` or `dst.old`."""
    dst = Path(dst)
    tmp, old = dst.with_name(dst.name + ".tmp"), dst.with_name(dst.name + ".old")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        # safetensors creates its files 0600 whatever the umask: give every file what the umask gives a new
        # file (the folder's own mode, which mkdir took from the umask, less the execute bits), so that a
        # folder shared or served from another account reads whole
        mode = tmp.stat().st_mode & 0o666
        for f in tmp.iterdir():
            os.chmod(f, mode)
            with open(f, "rb") as fh:  # make the bytes durable before the rename publishes them
                os.fsync(fh.fileno())
    except (OSError, SafetensorError) as e:  # disk full, read-only, no permission: dst was not touched
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split(": ", 1)[-1]
        fix = write_fix(e.errno) if isinstance(e, OSError) else "free space or fix permissions"
        raise UserError(f"could not write {dst} ({reason}); it is unchanged: {fix}, then run again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        _remove(old)
        os.replace(dst, old)
    os.replace(tmp, dst)
    _remove(old)


def _remove(path: Path) -> None:
    """Delete a file or folder if present (atomic_dir's previous copy: --force may replace a file)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


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
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        assert isinstance(inner, torch.nn.Module)  # what DDP and torch.compile wrap
        model = inner
    return model  # type: ignore[return-value]


def write_model_files(folder: Path, model: torch.nn.Module, lora: AdapterRecord | None = None) -> None:
    """Write config.json + model.safetensors into an existing folder (no atomic swap).

    With `lora` (a LoRA run), the adapters alone + their record instead of the weights (train.adapters)."""
    m = unwrap(model)
    m.config.save(folder / CONFIG)
    if lora is not None:
        save_file(
            adapter_state(m), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt", "library": "nanogpt"}
        )
        write_record(folder, lora)
        return
    save_file(model_state(m), str(folder / WEIGHTS), metadata={"format": "pt", "library": "nanogpt"})


def save_model(dst: str | Path, model: torch.nn.Module, lora: AdapterRecord | None = None) -> Path:
    with atomic_dir(dst) as tmp:
        write_model_files(tmp, model, lora)
    return Path(dst)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a path: the folder itself, or a run folder's `best/` then `last/`.

    Refuses, in one line each: a missing path, a file (config.json or the weights themselves), a config.json
    that is not a JSON object, and a Hugging Face folder (its config.json has a `model_type`, which a
    nanogpt config never has): an export is converted back with `nanogpt import`.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"checkpoint {p} not found; pass a run folder or a checkpoint folder holding {CONFIG} and {WEIGHTS}"
        )
    if p.is_file():
        hint = f"its folder {p.parent}" if p.name in (CONFIG, WEIGHTS) else f"the folder holding {CONFIG}"
        raise UserError(f"{p} is a file, not a checkpoint folder; pass {hint}")
    found = (
        [recover_dir(p)] if (recover_dir(p) / WEIGHTS).is_file() or is_adapter_folder(recover_dir(p)) else []
    )
    run = RunFolder(p)
    found += [recover_dir(sub) for sub in (run.best, run.last) if (recover_dir(sub) / CONFIG).is_file()]
    if (recover_dir(p) / CONFIG).is_file():  # config without weights: load_weights names what is missing
        found.append(recover_dir(p))
    if not found:
        raise UserError(
            f"{p} holds no checkpoint ({CONFIG} + {WEIGHTS}, or best/ or last/ with them); "
            "train one with `nanogpt train`"
        )
    folder = found[0]
    try:
        conf = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        return folder  # ModelConfig.load names what is wrong with it
    if not isinstance(conf, dict):
        raise UserError(
            f"{folder / CONFIG} is not a nanogpt model config: it holds {json.dumps(conf)[:30]}, not a JSON "
            "object; pass a checkpoint written by `nanogpt train` or `nanogpt import`"
        )
    kind = conf.get("model_type")
    if kind in ("gpt2", "nanogpt"):  # what `nanogpt export` writes (remote-code or native GPT-2)
        raise UserError(
            f"{p} is a Hugging Face export (model_type {kind!r}), not a nanogpt checkpoint; "
            f"convert it with `nanogpt import --hf {p} --out RUN`"
        )
    if isinstance(kind, str):
        raise UserError(
            f"{p} is a Hugging Face {kind!r} model, not a nanogpt checkpoint; `nanogpt import --hf DIR --out RUN` "
            "converts only GPT-2 (model_type 'gpt2') and nanogpt's own exports"
        )
    return folder


def load_config_of(path: str | Path) -> ModelConfig:
    return ModelConfig.load(resolve_checkpoint(path) / CONFIG)


def load_weights(folder: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A checkpoint's weights by their shared names; a LoRA checkpoint's are its base's with the adapters
    merged in (W + B @ A * alpha / r), so every loader gets the fine-tuned model."""
    if is_adapter_folder(folder):
        record, base, adapters = load_lora_parts(folder, device)
        return merge_state(base, adapters, record.spec.scale)
    return read_tensors(folder / WEIGHTS, device)


def weights_file(folder: Path) -> Path:
    """The file whose sha256 identifies a checkpoint: its adapters for a LoRA one, else its weights."""
    return folder / (ADAPTER_WEIGHTS if is_adapter_folder(folder) else WEIGHTS)


def lora_base(folder: Path) -> tuple[AdapterRecord, Path]:
    """A LoRA checkpoint's record and its base checkpoint folder, checked to be there and unchanged."""
    record = read_record(folder)
    base = record.base
    found = base if (base / CONFIG).is_file() else None
    check_base(record, folder, weights_file(base) if found else None)
    key = first_config_difference(ModelConfig.load(folder / CONFIG), ModelConfig.load(base / CONFIG))
    if key is not None:
        raise UserError(
            f"{folder / CONFIG} differs from its base {base / CONFIG} at {key!r}; the LoRA checkpoint is "
            "damaged, use another one or train the adapters again"
        )
    return record, base


def load_lora_parts(
    folder: Path, device: str | torch.device = "cpu"
) -> tuple[AdapterRecord, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LoRA checkpoint's record, its base's weights (merged, if the base is a LoRA run too) and its adapters
    (names and shapes checked against the config)."""
    record, base = lora_base(folder)
    base_sd = load_weights(base, device)
    adapters = load_adapter_file(folder, device)
    cfg = ModelConfig.load(folder / CONFIG)
    expected = adapter_shapes(cfg, record.spec)
    check_weights(expected, {k: tuple(v.shape) for k, v in adapters.items()}, folder / ADAPTER_WEIGHTS)
    return record, base_sd, adapters


def first_config_difference(a: ModelConfig, b: ModelConfig) -> str | None:
    """The first model config key (dropout aside: a run may change it) where `a` and `b` differ."""
    da, db = a.to_dict(), b.to_dict()
    return next((k for k in da if k != "dropout" and da[k] != db.get(k)), None)


def check_weights(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str | Path
) -> None:
    """One-line errors naming the first missing, unexpected or mis-shaped tensor (names -> shapes, any backend)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        what = f"is missing {missing[0]!r}" if missing else f"has unexpected {unexpected[0]!r}"
        raise UserError(
            f"weights in {source} do not match config.json: the file {what}; the checkpoint is mismatched, "
            "use the config.json these weights were saved with or another checkpoint"
        )
    for k, shape in expected.items():
        if tuple(found[k]) != tuple(shape):
            raise UserError(
                f"weights in {source} do not match config.json: {k} has shape {tuple(found[k])}, "
                f"config expects {tuple(shape)}; the checkpoint is mismatched, use the config.json these weights "
                "were saved with or another checkpoint"
            )


def load_state_into(model: NanoGPTLMHeadModel, sd: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load weights (a tied lm_head.weight in the file is ignored) after `check_weights`."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop(TIED_KEY)
        sd = {k: v for k, v in sd.items() if k != TIED_KEY}
    check_weights(expected, {k: tuple(v.shape) for k, v in sd.items()}, source)
    model.load_state_dict(sd, strict=False)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> NanoGPTLMHeadModel:
    folder = resolve_checkpoint(path)
    cfg = ModelConfig.load(folder / CONFIG)
    model = NanoGPTLMHeadModel(cfg)
    load_state_into(model, load_weights(folder), folder / WEIGHTS)
    return model.to(device).eval()


def check_resumable(run: str | Path) -> None:
    """Refuse `--resume` of a folder that holds no run, or a run killed before its first checkpoint."""
    folder = RunFolder(Path(run))
    if not folder.config.is_file():
        raise UserError(f"{run}/config.json not found: nothing to resume; drop --resume to start a new run")
    if not folder.has_checkpoint():
        raise UserError(
            f"{run} holds no checkpoint yet (the run stopped before its first one); "
            "run the same command without --resume to start it again"
        )


def saved_data_dir(run: str | Path) -> str | None:
    """The data folder a run trained on (its resume point's state.json): `--resume` without `--data`.

    A folder with nothing to resume is refused here, before "--data is required" could mislead.
    """
    check_resumable(run)
    state = RunFolder(Path(run)).resume_point / STATE_JSON
    data = read_json(state, "training state").get("data_dir")
    return data if isinstance(data, str) else None


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# --- training state: optimizer moments, RNG states, counters (no pickles) ----------------------------

STATE_TENSORS = "state.safetensors"
_OPT_PREFIX = "optimizer."
_IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable")


@dataclass
class TrainState:
    """What `load_train_state` read: the JSON scalars (`info`) and the extra tensors saved beside them."""

    info: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def optimizer_tensors(optimizer: TrainOptimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict into safetensors-ready tensors and JSON-ready scalars.

    Tensors are named `optimizer.<param index>.<key>` (AdamW: step, exp_avg, exp_avg_sq), kept exact
    (fp32 moments stay fp32); hyper-parameters and any non-tensor state go to the JSON side.
    """
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPT_PREFIX}{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_tensors(
    optimizer: TrainOptimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Inverse of `optimizer_tensors`: rebuild the state_dict and load it (torch moves it to each param)."""
    try:
        state: dict[int, dict[str, Any]] = {}
        for name, value in tensors.items():
            if name.startswith(_OPT_PREFIX):
                idx, key = name[len(_OPT_PREFIX) :].split(".", 1)
                state.setdefault(int(idx), {})[key] = value
        for idx, extra in meta.get("scalars", {}).items():
            state.setdefault(int(idx), {}).update(extra)
        groups = meta["param_groups"]
        for saved, current in zip(groups, optimizer.param_groups, strict=True):
            # JSON has no tuples: AdamW's betas, Muon's ns_coefficients were
            saved.update({k: tuple(v) for k, v in saved.items() if isinstance(current.get(k), tuple)})
            # the implementation (fused on CUDA, foreach, ...) belongs to this device, not to the saved run
            saved.update({k: current[k] for k in _IMPL_KEYS if k in current})
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # another model's, or a damaged state.json
        raise UserError(
            f"optimizer state does not fit this model ({e}); resume with the run's own config, or from another "
            "checkpoint if this one is damaged"
        ) from None


def save_train_state(
    folder: Path, optimizer: TrainOptimizer, tensors: dict[str, torch.Tensor], info: dict[str, Any]
) -> None:
    """Write `state.safetensors` (optimizer moments + `tensors`, e.g. RNG states as uint8) and `state.json`."""
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    clash = set(opt_tensors) & set(tensors)
    if clash:
        raise ValueError(f"tensor name {sorted(clash)[0]!r} is reserved for the optimizer state")
    all_tensors = {**opt_tensors, **{k: v.detach().cpu().contiguous() for k, v in tensors.items()}}
    save_file(all_tensors, str(folder / STATE_TENSORS), metadata={"format": "pt", "library": "nanogpt"})
    write_json(folder / STATE_JSON, {**info, "optimizer": opt_meta})


def load_train_state(folder: Path, optimizer: TrainOptimizer | None = None) -> TrainState:
    """Read a checkpoint's training state; with `optimizer`, load its moments and step counts into it."""
    tfile, jfile = folder / STATE_TENSORS, folder / STATE_JSON
    if not (tfile.is_file() and jfile.is_file()):
        raise UserError(
            f"{folder} holds no training state ({STATE_TENSORS} + {STATE_JSON}); it cannot be resumed, "
            "start a new run (use --init-from to reuse its weights)"
        )
    try:
        tensors = load_file(str(tfile))
        info = json.loads(jfile.read_text())
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(
            f"training state in {folder} is corrupt ({e}); resume from another checkpoint"
        ) from None
    if info.get("backend") == "mlx":
        raise UserError(f"{folder} was written by the MLX trainer; resume it with --backend mlx")
    opt_meta = info.pop("optimizer", None)
    if optimizer is not None:
        if opt_meta is None:
            raise UserError(f"{jfile} has no optimizer section; the checkpoint is incomplete")
        load_optimizer_tensors(optimizer, tensors, opt_meta)
    extra = {k: v for k, v in tensors.items() if not k.startswith(_OPT_PREFIX)}
    return TrainState(info=info, tensors=extra)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states: python and numpy (JSON-able), torch CPU and CUDA (uint8 tensors)."""
    py_version, py_internal, py_gauss = random.getstate()
    # the legacy global RNG: (name, keys, pos, has_gauss, cached); typed as a dict for legacy=False
    np_state = cast(tuple[Any, ...], np.random.get_state())
    state: dict[str, Any] = {
        "python_rng": [py_version, list(py_internal), py_gauss],
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch_rng": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of `rng_state`."""
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def split_rank_states(states: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Per-process state dicts -> tensors named `rank<r>.<key>` (for safetensors) + the JSON-able rest."""
    tensors = {
        f"rank{r}.{k}": v for r, s in enumerate(states) for k, v in s.items() if isinstance(v, torch.Tensor)
    }
    plain = [{k: v for k, v in s.items() if not isinstance(v, torch.Tensor)} for s in states]
    return tensors, plain


def join_rank_state(
    plain: list[dict[str, Any]], tensors: dict[str, torch.Tensor], rank: int
) -> dict[str, Any]:
    """Inverse of `split_rank_states` for one process."""
    prefix = f"rank{rank}."
    return {**plain[rank], **{k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}}
