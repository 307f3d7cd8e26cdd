"""A LoRA run's adapters as a PEFT adapter folder, for the export format of its base.

`nanogpt export --model LORA_RUN --out DIR --adapter-only [--format remote-code|gpt2]` writes
`adapter_config.json` + `adapter_model.safetensors` that `peft.PeftModel.from_pretrained(base, DIR)` loads
on `nanogpt export --model BASE --format <the same>` (the base the run recorded). The adapter tensors are
ours unchanged, A (r, in) and B (out, r); only the names follow the format: the remote-code model keeps
nanogpt's module names, the native GPT-2 one renames them (`transformer.h.N.attn.c_attn`) and marks the
layers `fan_in_fan_out`, because GPT-2's Conv1D stores its weight as (in, out).

    result = export_adapter("runs/lora", "exports/lora-adapter", "gpt2")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from nanogpt.config import ModelConfig
from nanogpt.errors import UserError
from nanogpt.export.hf import FORMATS, check_gpt2_expressible, gpt2_name
from nanogpt.folders import claim, mark
from nanogpt.model.lora import A_SUFFIX, B_SUFFIX
from nanogpt.train.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_folder
from nanogpt.train.checkpoint import CONFIG, atomic_dir, load_lora_parts, resolve_checkpoint, write_json

PEFT_PREFIX = "base_model.model."  # how a PeftModel names the wrapped model's tensors in its adapter file


@dataclass(frozen=True)
class AdapterExport:
    out: Path
    format: str
    base: Path  # the base checkpoint the adapters apply to (export it with the same --format)
    n_params: int
    files: list[str]


def peft_module_name(module: str, fmt: str) -> str:
    """Our module name (`transformer.blocks.0.attn.qkv_proj`) in the exported model of format `fmt`."""
    if fmt == "gpt2":
        return gpt2_name(module + ".weight")[0].removesuffix(".weight")
    return module


def peft_config(modules: list[str], rank: int, alpha: float, dropout: float, fmt: str) -> dict[str, Any]:
    """adapter_config.json: the target modules by full name (GPT-2's c_proj is two different layers)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": modules,
        "fan_in_fan_out": fmt == "gpt2",
        "bias": "none",
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }


def export_adapter(model_path: str | Path, out: str | Path, fmt: str, force: bool = False) -> AdapterExport:
    """Write LoRA checkpoint `model_path`'s adapters as a PEFT folder `out` for the export format `fmt`."""
    if fmt not in FORMATS:
        raise UserError(f"--adapter-only writes a PEFT folder for {' or '.join(FORMATS)}, not {fmt}")
    folder = resolve_checkpoint(model_path)
    if not is_adapter_folder(folder):
        raise UserError(
            f"{model_path} is not a LoRA run (no {ADAPTER_CONFIG}); drop --adapter-only to export its weights"
        )
    cfg = ModelConfig.load(folder / CONFIG)
    if fmt == "gpt2":
        check_gpt2_expressible(cfg)
    record, _, adapters = load_lora_parts(folder)
    out = Path(out)
    claim(out, "export", force=force)
    renamed, modules = {}, []
    for key, value in adapters.items():
        suffix = A_SUFFIX if key.endswith(A_SUFFIX) else B_SUFFIX
        module = peft_module_name(key.removesuffix(suffix), fmt)
        renamed[PEFT_PREFIX + module + suffix] = value.contiguous()
        if suffix == A_SUFFIX:
            modules.append(module)
    spec = record.spec
    with atomic_dir(out) as tmp:
        write_json(tmp / ADAPTER_CONFIG, peft_config(modules, spec.rank, spec.alpha, spec.dropout, fmt))
        save_file(renamed, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        mark(tmp, "export", format=f"{fmt} adapter", source=str(folder), base=str(record.base))
        files = sorted(p.name for p in tmp.iterdir())
    return AdapterExport(out, fmt, record.base, sum(v.numel() for v in renamed.values()), files)
