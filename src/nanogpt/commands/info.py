"""The `nanogpt info` command: a config's network, parameter counts and weight memory, without training.

nanogpt info --preset card
"""

from __future__ import annotations

from nanogpt.config import PRESETS, resolve_model_config
from nanogpt.errors import ArgumentParser
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import load_config_of


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="nanogpt info", description="print a config's network, parameter counts and weight memory"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=list(PRESETS), help="a named model config (default: card)")
    src.add_argument("--config", help="a JSON config file (model keys, or the card's mixed block)")
    src.add_argument("--model", help="a checkpoint or run folder")
    args = p.parse_args(argv)
    cfg = load_config_of(args.model) if args.model else resolve_model_config(args.preset, args.config)
    model = NanoGPTLMHeadModel(cfg)
    total, unique = model.num_params(unique=False), model.num_params(unique=True)
    mib = 1024**2
    print(model)
    print(f"config: {cfg.to_dict()}")
    print(f"parameters: {total:,} counting the tied embedding twice (the card's figure), {unique:,} unique")
    print(f"weights fp32: {total * 4 / mib:.1f} MiB ({unique * 4 / mib:.1f} MiB unique)")
    print(f"weights fp16: {total * 2 / mib:.1f} MiB ({unique * 2 / mib:.1f} MiB unique)")
    return 0
