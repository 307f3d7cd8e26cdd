"""LoRA checkpoints: the adapters of a run and the record of the base they were trained on.

A LoRA checkpoint folder (`RUN/last/`, `RUN/best/`) holds `config.json` (the base's ModelConfig),
`adapter_model.safetensors` (only the adapters: `<module>.lora_A.weight` (r, in), `<module>.lora_B.weight`
(out, r), the same in both backends) and `adapter_config.json`: the LoRA settings and the base checkpoint's
folder and the sha256 of its weights file. Whoever loads such a folder (`train.checkpoint.load_weights`)
applies the adapters to that base, and refuses in one line a base that moved or changed.

    record = read_record(folder)          # AdapterRecord: spec, base folder, base sha256
    check_base(record, folder, weights)   # the base is where it was and unchanged
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nanogpt.config import TrainConfig
from nanogpt.errors import UserError
from nanogpt.model.lora import LoRASpec

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = (
    "nanogpt-lora"  # adapter_config.json's "format": ours, not PEFT's (export --adapter-only writes PEFT's)
)


@dataclass(frozen=True)
class AdapterRecord:
    """adapter_config.json: the adapters' settings and the base checkpoint they apply to."""

    spec: LoRASpec
    base: Path  # the base checkpoint folder (absolute)
    base_sha256: str  # of its weights file (model.safetensors, or a LoRA base's adapter_model.safetensors)

    def to_dict(self) -> dict[str, Any]:
        s = self.spec
        return {
            "format": FORMAT,
            "lora_rank": s.rank,
            "lora_alpha": s.alpha,
            "lora_dropout": s.dropout,
            "lora_targets": list(s.targets),
            "base_checkpoint": str(self.base),
            "base_sha256": self.base_sha256,
        }


def spec_of(cfg: TrainConfig) -> LoRASpec:
    return LoRASpec(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets))


def is_adapter_folder(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_record(folder: Path, record: AdapterRecord) -> None:
    (folder / ADAPTER_CONFIG).write_text(json.dumps(record.to_dict(), indent=2) + "\n")


def read_record(folder: Path) -> AdapterRecord:
    """The folder's adapter_config.json, or a one-line error naming what is wrong with it."""
    f = folder / ADAPTER_CONFIG
    try:
        d = json.loads(f.read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"format is {d.get('format')!r}, not {FORMAT!r}")
        cfg = TrainConfig(
            lora_rank=d["lora_rank"],
            lora_alpha=d["lora_alpha"],
            lora_dropout=d["lora_dropout"],
            lora_targets=tuple(d["lora_targets"]),
        )
        if (
            cfg.lora_rank < 1
            or not isinstance(d["base_checkpoint"], str)
            or not isinstance(d["base_sha256"], str)
        ):
            raise ValueError("lora_rank, base_checkpoint or base_sha256 is not valid")
        return AdapterRecord(spec_of(cfg), Path(d["base_checkpoint"]), d["base_sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError) as e:
        raise UserError(
            f"{f} is not a nanogpt LoRA record ({e}); use another checkpoint or train the adapters again"
        ) from None


def check_base(record: AdapterRecord, source: Path, weights: Path | None) -> None:
    """Refuse, in one line, a base that is gone (`weights` None or missing) or whose weights changed."""
    where = f"{source / ADAPTER_CONFIG}"
    if weights is None or not weights.is_file():
        raise UserError(
            f"the base checkpoint {record.base} that the LoRA adapters in {source} were trained on is not there "
            f"(moved or deleted); put it back at that path, or set base_checkpoint in {where} to where it is now"
        )
    if file_sha256(weights) != record.base_sha256:
        raise UserError(
            f"the base checkpoint {record.base} has changed since the LoRA adapters in {source} were trained on "
            f"it ({weights.name}'s sha256 differs from {where}); restore that base, or train the adapters again"
        )


def load_adapter_file(folder: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return read_tensors(folder / ADAPTER_WEIGHTS, device, "the LoRA checkpoint")


def read_tensors(f: Path, device: str | torch.device, what: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """A safetensors file of `what` (a checkpoint's weights or adapters); missing or corrupt is one line."""
    if not f.is_file():
        raise UserError(f"{f} not found; {what} is incomplete, use another one or train again")
    try:
        return load_file(str(f), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{f} is corrupt or not a safetensors file ({e}); use another checkpoint") from None
