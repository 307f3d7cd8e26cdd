"""The `nanogpt train` command: one flag per TrainConfig field, config resolution, and `main`.

Settings come, in order, from a preset or a `--config` file (or the run's own on `--resume`), then flags;
`nanogpt.train.loop.train` does the work (`nanogpt.mlx.train.loop.train` with `--backend mlx`).

    nanogpt train --data data/builtin --out runs/tiny --preset tiny --max-iters 2000
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from nanogpt.commands.options import (
    DEVICE_HELP,
    add_backend,
    add_device,
    add_dtype,
    add_threads,
    add_tracker,
    apply_threads,
)
from nanogpt.config import (
    OPTIMIZERS,
    PRESETS,
    RECIPES,
    ModelConfig,
    TrainConfig,
    describe_recipe,
    finetune_recipe,
    override,
    preset,
    read_json,
    recipe,
)
from nanogpt.errors import ArgumentParser, UserError
from nanogpt.folders import RunFolder
from nanogpt.train.checkpoint import load_config_of, saved_data_dir
from nanogpt.train.loop import TrainResult, train
from nanogpt.train.plot import plot_run
from nanogpt.train.tracking import check_installed, parse_trackers


def _number(kind: type) -> Callable[[str], Any]:
    """An argparse type accepting 1e6 / 1_000_000 for ints too."""

    def parse(s: str) -> Any:
        v = float(s.replace("_", ""))
        if kind is int:
            if v != int(v):
                raise argparse.ArgumentTypeError(f"{s!r} is not a whole number")
            return int(v)
        return v

    parse.__name__ = kind.__name__
    return parse


def add_train_config_flags(
    p: argparse.ArgumentParser, skip_prefix: str | None = None, presets: bool = True
) -> None:
    """One flag per TrainConfig field (`--max-iters`, ...), default None so unset flags keep the config's.

    `presets`: the command has `--preset`, so the help names where the small presets' recipe differs."""
    g = p.add_argument_group("training config (TrainConfig fields; defaults: the card's recipe)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if skip_prefix and f.name.startswith(skip_prefix):
            continue
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if presets and f.name in RECIPES["tiny"]:  # the small presets' recipe differs here
            default = f"{default}; --preset small/tiny: {RECIPES['tiny'][f.name]}"
        elif presets and f.name == "warmup_iters":
            default = f"{default}; --preset small/tiny: ~5%% of max_iters"
        if f.name == "device":  # the shared options, unset (None) here: the config's value stays
            add_device(g, default=None, help=f"{DEVICE_HELP}; default {default}")
        elif f.name == "dtype":
            add_dtype(g, default=None, help=f"default {default}")
        elif f.name == "optimizer":
            g.add_argument(flag, choices=OPTIMIZERS, default=None, help=f"default {default}")
        elif f.type == "bool":
            g.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=f"default {default}"
            )
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            conv = _number(kind) if kind in (int, float) else str
            g.add_argument(
                flag, type=conv, default=None, metavar=kind.__name__.upper(), help=f"default {default}"
            )


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="nanogpt train",
        description="Train a model into a run folder (resumable; torchrun for many processes). "
        "Unset flags keep the config's or the preset's values: each preset has a training recipe for its "
        "size (the card's for card; batch 8 and Muon for small and tiny, at lr 4e-3 and 8e-3), printed as the run starts. "
        "--init-from alone takes the fine-tuning recipe (AdamW lr 1e-4, 1,000 iterations, ~3%% warmup; with "
        "--lora-rank, LoRA's: lr 3e-4, base frozen, only the adapters saved).",
    )
    p.add_argument(
        "--data", help="prepared data folder (`nanogpt prepare`); on --resume defaults to the run's"
    )
    p.add_argument("--out", help="run folder to create (or continue with --resume)")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="model preset and its training recipe (default: card, or the run's on --resume)",
    )
    src.add_argument("--config", help="JSON config: model keys, training keys, or both (the card's block)")
    p.add_argument("--dropout", type=float, help="model dropout (a model config key)")
    p.add_argument("--resume", action="store_true", help="continue RUN from RUN/last/")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace whatever is at --out (else only a run with no checkpoint)",
    )
    p.add_argument("--init-from", metavar="CKPT", help="start from this checkpoint's weights (fine-tuning)")
    p.add_argument("--plot", metavar="RUN", help="only regenerate RUN/loss.png from RUN/log.jsonl")
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s per device for the MFU estimate")
    add_threads(p, help="torch CPU threads (fix it for bit-identical resumes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_tracker(p)
    add_backend(p, help="PyTorch (default) or Apple MLX (fp32)")
    add_train_config_flags(p)
    return p


def resolve_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """Model and training configs from, in order: preset/config/the run's/init-from's, then flags.

    A preset brings its own training recipe (config.RECIPES: the card's for `card`, the demo's for the small
    ones); otherwise training starts from the card's. On --resume training settings start from the run's
    train_config.json, then a --config file's training keys, then flags.
    """
    run = Path(args.out)
    file_keys: dict[str, Any] = {}
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    if args.config:
        from nanogpt.config import load_config

        model_cfg, train_cfg = load_config(args.config)
        file_keys = json.loads(Path(args.config).read_text())
    elif args.preset:
        model_cfg, train_cfg = preset(args.preset), recipe(args.preset, **flags)  # warmup follows --max-iters
    elif args.resume and RunFolder(run).config.is_file():
        model_cfg, train_cfg = ModelConfig.load(RunFolder(run).config), TrainConfig()
    elif args.init_from:  # fine-tuning: its own recipe (LoRA's with --lora-rank), warmup ~3% of --max-iters
        model_cfg, train_cfg = load_config_of(args.init_from), finetune_recipe(**flags)
    else:
        model_cfg, train_cfg = preset("card"), TrainConfig()
    if args.resume and RunFolder(run).train_config.is_file():
        saved = TrainConfig.from_dict(read_json(RunFolder(run).train_config, "training config"))
        names = {f.name for f in fields(TrainConfig)}
        train_cfg = override(saved, **{k: v for k, v in file_keys.items() if k in names})
    model_cfg = override(model_cfg, dropout=args.dropout)
    train_cfg = override(train_cfg, **flags)
    return model_cfg, train_cfg


def recipe_origin(args: argparse.Namespace) -> str:
    """Where the run's training settings come from, for the line printed at its start."""
    if args.resume and RunFolder(Path(args.out)).train_config.is_file():
        return f"the run's {RunFolder(Path(args.out)).train_config.name}"
    if args.config:
        return f"{args.config} over the card's recipe"
    if args.preset:
        return f"preset {args.preset!r}'s recipe" + (" (the card's)" if args.preset == "card" else "")
    if args.init_from:
        return "the " + ("LoRA " if (args.lora_rank or 0) > 0 else "") + "fine-tuning recipe"
    return "the card's recipe"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args)
    if args.plot:
        print(plot_run(args.plot))
        return 0
    if not args.out:
        raise UserError("--out RUN is required: the run folder to write (or --plot RUN to only draw a log)")
    trackers = parse_trackers(args.tracker)
    check_installed(trackers)
    if (args.lora_rank or 0) > 0 and not args.init_from and not args.resume:
        raise UserError(
            "--lora-rank needs --init-from BASE: the checkpoint (run or folder) whose frozen weights LoRA adapts"
        )
    if (args.lora_rank or 0) > 0 and args.optimizer is None and not args.resume:
        args.optimizer = "adamw"  # a preset's Muon is for pretraining; LoRA's adapters train with AdamW
    model_cfg, train_cfg = resolve_configs(args)
    data = args.data
    if data is None and args.resume:
        data = saved_data_dir(args.out)
    if data is None:
        raise UserError("--data DIR is required: a folder made by `nanogpt prepare`")
    origin = recipe_origin(args)
    if args.backend == "mlx" and args.optimizer is None and train_cfg.optimizer == "muon" and not args.resume:
        train_cfg = replace(
            train_cfg, optimizer="adamw"
        )  # the recipe's Muon runs in the PyTorch backend only
        origin += "; AdamW in place of Muon, which the MLX backend lacks"
    if int(os.environ.get("RANK", 0)) == 0:
        flags = (
            " and your flags" if any(getattr(args, f.name) is not None for f in fields(TrainConfig)) else ""
        )
        print(f"training: {describe_recipe(train_cfg, model_cfg.context_length)} ({origin}{flags})")
    trainer: Callable[..., TrainResult] = train  # both backends take the same arguments used here
    if args.backend == "mlx":
        from nanogpt.mlx.train.loop import train as mlx_train  # raises a one-line error without MLX

        trainer = mlx_train
    result = trainer(
        model_cfg,
        train_cfg,
        data,
        args.out,
        resume=args.resume,
        force=args.force,
        init_from=args.init_from,
        progress=not args.no_progress,
        peak_flops=args.peak_flops,
        trackers=trackers,
    )
    if int(os.environ.get("RANK", 0)) == 0:
        best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
        print(
            f"{result.run_dir}: {result.steps} steps, {result.tokens:,} tokens, "
            f"{result.tokens_per_s:,.0f} tokens/s, best val loss {best}"
        )
    return 0
