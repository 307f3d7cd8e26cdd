"""The one configuration that every part of nanogpt shares.

`ModelConfig` describes the network (read by the PyTorch model, the MLX model and both exporters);
`TrainConfig` describes a training run. Both are plain dataclasses, serialised as JSON, and this module
imports no torch so that any tool can read a config cheaply.

    model_cfg, train_cfg = load_config("card.json")   # the card's mixed JSON block loads as is
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from nanogpt.errors import UserError

NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("gelu", "gelu_tanh")  # exact erf GELU (the card, BERT) or GPT-2's tanh approximation
DTYPE_NAMES = ("fp32", "bf16", "fp16")  # training/inference precisions (torch dtypes in kernels/device.py)
OPTIMIZERS = ("adamw", "muon")  # muon: Muon for the blocks' weight matrices, AdamW for the rest
LORA_TARGETS = ("qkv_proj", "out_proj", "fc1", "fc2")  # the blocks' Linear layers LoRA may adapt


# --- validation: every config, however it was made (JSON, flags, code), is checked when it is built ----


def _check_types(cfg: Any, what: str) -> None:
    """Each field holds its declared type (JSON gives "big", 384.0, 1e400 or true for an int just as easily)."""
    for f in fields(cfg):
        value, kinds = getattr(cfg, f.name), str(f.type).replace(" ", "").split("|")
        if value is None and "None" in kinds:
            continue
        if "bool" in kinds:
            ok, want = isinstance(value, bool), "true or false"
        elif "int" in kinds:
            ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        elif "float" in kinds:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            want = "a finite number"
        elif kinds[0].startswith("tuple"):  # lora_targets (JSON's list and a flag's string are made tuples)
            ok, want = isinstance(value, tuple) and all(isinstance(v, str) for v in value), "a list of names"
        else:
            ok, want = isinstance(value, str), "a string"
        if not ok:
            raise UserError(f"{f.name}={value!r} in the {what} must be {want}; {_fix(cfg, f.name)}")


def _require(cfg: Any, name: str, ok: bool, rule: str) -> None:
    if not ok:
        raise UserError(f"{name}={getattr(cfg, name)!r} must be {rule}; {_fix(cfg, name)}")


def _fix(cfg: Any, name: str) -> str:
    if hasattr(cfg, "learning_rate") or name == "dropout":  # training keys and dropout have flags
        return f"pass a valid --{name.replace('_', '-')} or fix it in the config file"
    return f"fix {name} in the config file"


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network. Defaults are the model card's exact model (the `card` preset)."""

    vocab_size: int = 50257
    d_model: int = 384
    n_layers: int = 8
    n_heads: int = 8
    d_ff: int = 1536
    context_length: int = 512
    dropout: float = 0.1
    bias: bool = True  # biases in every Linear and LayerNorm except lm_head
    tie_embeddings: bool = True  # lm_head.weight is transformer.token_embedding.weight
    ln_eps: float = 1e-5
    norm_position: str = "pre"  # "pre": x + f(ln(x)) as in GPT-2; "post": ln(x + f(x)) as in BERT
    activation: str = "gelu"

    def __post_init__(self) -> None:
        _check_types(self, "model config")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "context_length"):
            _require(self, name, getattr(self, name) > 0, "a whole number > 0")
        _require(self, "dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)")
        _require(self, "ln_eps", self.ln_eps > 0, "a number > 0")
        if self.d_model % self.n_heads:
            raise UserError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; pick n_heads that divides it"
            )
        if self.norm_position not in NORM_POSITIONS:
            raise UserError(f"norm_position={self.norm_position!r} is unknown; use one of {NORM_POSITIONS}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"activation={self.activation!r} is unknown; use one of {ACTIVATIONS}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        _check_keys(d, _names(cls), "model config")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_json(path))


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the card's base-pretraining recipe (20K iters, 12 x 512, AdamW 3e-4)."""

    batch_size: int = 12  # sequences per micro-batch per process
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 3e-4
    min_lr: float = 3e-5  # cosine decays to this floor
    warmup_iters: int = 500
    lr_decay_iters: int | None = None  # None: decay over max_iters
    max_iters: int = 20000
    max_tokens: int | None = None  # stop after this many training tokens (all processes)
    max_time: float | None = None  # stop after this many seconds of training
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 500
    eval_iters: int = 50
    log_interval: int = 10
    seed: int = 1337
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    compile: bool = False  # torch.compile the model (CUDA)
    optimizer: str = "adamw"  # adamw | muon (train/optim.py; the card's recipe is AdamW)
    # knowledge distillation (the card's second stage)
    distill_alpha: float = 0.5  # weight of the hard (data) loss; 1 - alpha goes to the soft (teacher) loss
    distill_temperature: float = 1.0
    # LoRA (model/lora.py, mlx/lora.py): rank 0 is full fine-tuning; > 0 freezes the base (--init-from) and
    # trains B @ A * alpha / rank beside each target Linear
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # on the adapter's input only
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, (list, str)):  # JSON's list, a flag's "qkv_proj,fc1"
            names = self.lora_targets.split(",") if isinstance(self.lora_targets, str) else self.lora_targets
            object.__setattr__(
                self, "lora_targets", tuple(n.strip() if isinstance(n, str) else n for n in names)
            )
        _check_types(self, "training config")
        for name in ("batch_size", "grad_accum_steps", "eval_interval", "eval_iters", "log_interval"):
            _require(self, name, getattr(self, name) > 0, "a whole number > 0")
        for name in ("max_iters", "warmup_iters"):
            _require(self, name, getattr(self, name) >= 0, "a whole number >= 0")
        _require(self, "lr_decay_iters", (self.lr_decay_iters or 1) > 0, "> 0 (or unset)")
        for name in ("max_tokens", "max_time"):  # 0 stops at once (tests, dry runs)
            _require(self, name, (getattr(self, name) or 0) >= 0, ">= 0 (or unset)")
        _require(self, "learning_rate", self.learning_rate > 0, "a number > 0, e.g. 3e-4")
        _require(self, "min_lr", self.min_lr >= 0, "a number >= 0")
        for name in ("weight_decay", "grad_clip"):
            _require(self, name, getattr(self, name) >= 0, "a number >= 0")
        for name in ("beta1", "beta2"):
            _require(self, name, 0 <= getattr(self, name) < 1, "in [0, 1)")
        _require(self, "distill_alpha", 0 <= self.distill_alpha <= 1, "in [0, 1]")
        _require(self, "distill_temperature", self.distill_temperature > 0, "a number > 0")
        if self.dtype not in DTYPE_NAMES:
            raise UserError(f"dtype={self.dtype!r} is unknown; use one of {', '.join(DTYPE_NAMES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"optimizer={self.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
        self._check_lora()

    def _check_lora(self) -> None:
        _require(self, "lora_rank", self.lora_rank >= 0, "a whole number >= 0 (0: full fine-tuning)")
        _require(self, "lora_alpha", self.lora_alpha > 0, "a number > 0, e.g. 16")
        _require(self, "lora_dropout", 0.0 <= self.lora_dropout < 1.0, "in [0, 1)")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown or not self.lora_targets or len(set(self.lora_targets)) != len(self.lora_targets):
            what = f"{unknown[0]!r} is unknown" if unknown else "must name each target once"
            raise UserError(
                f"--lora-targets: {what}; pass a comma-separated subset of {','.join(LORA_TARGETS)}"
            )
        if self.lora_rank and self.optimizer != "adamw":
            raise UserError(
                f"LoRA trains its adapters with AdamW, not {self.optimizer}; drop --optimizer or pass adamw"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        _check_keys(d, _names(cls), "training config")
        return cls(**d)


# Presets. `card` is the card's exact model; `small` and `tiny` are sized so that the CPU demo learns
# visibly in minutes on 2 cores (the 50,257-row embedding dominates their cost).
PRESETS: dict[str, ModelConfig] = {
    "card": ModelConfig(),
    "small": ModelConfig(d_model=256, n_layers=4, n_heads=4, d_ff=1024, context_length=256, dropout=0.0),
    "tiny": ModelConfig(d_model=128, n_layers=4, n_heads=4, d_ff=512, context_length=128, dropout=0.0),
}


# Training recipes, one per preset: TrainConfig fields over its defaults (which are the card's recipe). The
# small presets take the demo's recipe, chosen by A/B runs at equal wall time on a 2-core CPU (docs/demo.md):
# a small batch for more updates, Muon for the blocks' matrices, and the higher rate small models need.
_SMALL_RECIPE: dict[str, Any] = {
    "batch_size": 8,
    "learning_rate": 4e-3,
    "min_lr": 4e-4,
    "optimizer": "muon",
    "max_iters": 2000,
    "eval_interval": 200,
    "eval_iters": 20,
    "log_interval": 5,
}
# `tiny` (the demo's preset) takes twice the rate: the winner of issue #30's A/B runs at equal wall time
_TINY_RECIPE: dict[str, Any] = {**_SMALL_RECIPE, "learning_rate": 8e-3, "min_lr": 8e-4}
RECIPES: dict[str, dict[str, Any]] = {"card": {}, "small": _SMALL_RECIPE, "tiny": _TINY_RECIPE}
SCALED_WARMUP = ("small", "tiny")  # presets whose warmup follows max_iters unless it is given


# The fine-tuning recipe `train --init-from` uses when no preset or config file is given: a short run at a
# rate far below pretraining's, so the base is adapted rather than overwritten. Full fine-tuning follows the
# usual 5e-5..1e-4 range with ~3% warmup and no weight decay (mlx-lm's full mode trains at 1e-5 on billion-scale
# models; ours are small and take the top of the range). LoRA trains only its adapters, which start at zero
# (B = 0) and need a higher rate: litgpt's finetune_lora uses 3e-4 with alpha 16, dropout 0.05.
_FINETUNE_COMMON: dict[str, Any] = {
    "batch_size": 8,
    "max_iters": 1000,
    "weight_decay": 0.0,
    "eval_interval": 100,
    "eval_iters": 20,
    "log_interval": 10,
    "optimizer": "adamw",
}
FINETUNE_RECIPE: dict[str, Any] = {**_FINETUNE_COMMON, "learning_rate": 1e-4, "min_lr": 1e-5}
LORA_RECIPE: dict[str, Any] = {**_FINETUNE_COMMON, "learning_rate": 3e-4, "min_lr": 3e-5}


def finetune_recipe(**changes: Any) -> TrainConfig:
    """The fine-tuning recipe (LoRA's when `lora_rank` > 0 among the changes) with `changes` applied.

    The warmup is about 3% of max_iters (at least 1) unless `warmup_iters` is among the changes."""
    base = LORA_RECIPE if (changes.get("lora_rank") or 0) > 0 else FINETUNE_RECIPE
    cfg = override(TrainConfig(**base), **changes)
    if changes.get("warmup_iters") is None:
        cfg = replace(cfg, warmup_iters=max(1, round(0.03 * cfg.max_iters)) if cfg.max_iters else 0)
    return cfg


def warmup_for(iters: int) -> int:
    """Warmup for a short run of `iters`: about 5%, at least 10, never more than a tenth of the run."""
    return min(max(10, iters // 20), max(1, iters // 10))


def recipe(name: str, **changes: Any) -> TrainConfig:
    """The training recipe of preset `name` with `changes` applied (None values ignored, as flags left unset).

    For the small presets the warmup is `warmup_for(max_iters)` unless `warmup_iters` is among the changes,
    so that `--max-iters 100` does not spend the whole run warming up.
    """
    preset(name)  # a one-line error for an unknown name
    cfg = override(TrainConfig(**RECIPES[name]), **changes)
    if name in SCALED_WARMUP and changes.get("warmup_iters") is None:
        cfg = replace(cfg, warmup_iters=warmup_for(cfg.max_iters))
    return cfg


def describe_recipe(cfg: TrainConfig, context_length: int) -> str:
    """One line that says how a run will train (printed at its start)."""
    accum = f" x {cfg.grad_accum_steps} accumulated" if cfg.grad_accum_steps > 1 else ""
    lora = ""
    if cfg.lora_rank:
        targets = ",".join(cfg.lora_targets)
        lora = (
            f"LoRA rank {cfg.lora_rank} alpha {cfg.lora_alpha:g} dropout {cfg.lora_dropout:g} on {targets}, "
        )
    return (
        f"{lora}batch {cfg.batch_size} x {context_length}{accum}, {cfg.optimizer} lr {cfg.learning_rate:g} -> "
        f"{cfg.min_lr:g} (cosine, warmup {cfg.warmup_iters}), {cfg.max_iters:,} iterations, held-out eval "
        f"every {cfg.eval_interval} ({cfg.eval_iters} batches), {cfg.dtype}"
    )


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve_model_config(preset_name: str | None = None, config: str | Path | None = None) -> ModelConfig:
    """The model config from `--config FILE` (model keys, or the card's mixed block) or `--preset NAME`."""
    if config is not None:
        return load_config(config)[0]
    return preset(preset_name or "card")


def load_config(path: str | Path) -> tuple[ModelConfig, TrainConfig]:
    """Load a JSON file holding model keys, training keys, or both mixed (as the card's block does)."""
    d = read_json(path)
    model_keys, train_keys = _names(ModelConfig), _names(TrainConfig)
    # the card's "learning_rate"/"batch_size" are training keys; everything else must be known somewhere
    _check_keys(d, model_keys | train_keys, f"config {path}")
    model = ModelConfig(**{k: v for k, v in d.items() if k in model_keys})
    train = TrainConfig(**{k: v for k, v in d.items() if k in train_keys})
    return model, train


ConfigT = TypeVar("ConfigT", "ModelConfig", "TrainConfig")


def override(cfg: ConfigT, **changes: Any) -> ConfigT:
    """Return `cfg` with the non-None `changes` applied (CLI flags left unset are None)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    _check_keys(changes, _names(type(cfg)), type(cfg).__name__)
    return replace(cfg, **changes)


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _check_keys(d: dict[str, Any], known: set[str], what: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"unknown key {unknown[0]!r} in {what}; known keys: {', '.join(sorted(known))}")


def read_json(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A JSON object from `path`, or a one-line error naming `what` is wrong with it (missing, not JSON, a list)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} not found; pass the path of a JSON file")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(
            f"{what} {p} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate it"
        ) from None
    except (ValueError, OSError) as e:  # not UTF-8 text, unreadable
        raise UserError(f"{what} {p} cannot be read as JSON text ({e}); fix or regenerate it") from None
    if not isinstance(d, dict):
        raise UserError(f"{what} {p} must hold a JSON object, not a {type(d).__name__}; fix or regenerate it")
    return d


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first key (in a's order, then b's) whose value differs between two config dicts."""
    for key in [*a, *(k for k in b if k not in a)]:
        if a.get(key) != b.get(key):
            return key
    return None


__all__ = [
    "ModelConfig",
    "TrainConfig",
    "PRESETS",
    "preset",
    "resolve_model_config",
    "load_config",
    "override",
    "read_json",
    "first_difference",
]
