"""The `nanogpt bench` command: the model card's benchmark table for a checkpoint or a preset, written out.

The rows are measured by `nanogpt.bench.run.run_bench`; this module reads the flags, loads or builds the
model, checks every setting before the output folder is made, and prints the table.

    nanogpt bench --preset card --peers --out bench/
"""

from __future__ import annotations

import sys

import torch

from nanogpt.bench.run import check_settings, make_out_dir, markdown_table, run_bench, write_outputs
from nanogpt.commands.options import add_backend, add_device, add_dtype, add_threads, apply_threads
from nanogpt.config import PRESETS, preset
from nanogpt.errors import ArgumentParser
from nanogpt.kernels.device import resolve_device
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import load_model


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="nanogpt bench",
        description="The model card's benchmark table, each row measured for what it says.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a checkpoint or run folder")
    src.add_argument("--preset", choices=list(PRESETS), help="a named config, random init (default: card)")
    add_backend(p, help="whose rows to measure")
    add_dtype(p, help="fp32, or bf16/fp16 autocast")
    add_device(p)
    p.add_argument("--peers", action="store_true", help="also run HF GPT2LMHeadModel at the same shapes")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile both models for the training and forward rows"
    )
    p.add_argument(
        "--out", default="bench", help="folder for bench.json, bench.md, bench.png (default: bench)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row after one warm-up (default: 3)")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch (default: 4, the card's)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default: 512, the card's)")
    add_threads(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args)
    device = resolve_device(args.device)
    if args.model:
        model = load_model(args.model, device)
    else:
        torch.manual_seed(0)
        model = NanoGPTLMHeadModel(preset(args.preset or "card")).to(device)
    seq = min(args.seq, model.config.context_length)
    check_settings(model.config, args.batch, seq, args.repeats, 1, args.dtype, args.backend, args.compile)
    make_out_dir(args.out)  # after the checks: a refused run leaves no folder behind
    res = run_bench(
        model,
        batch=args.batch,
        seq=seq,
        dtype=args.dtype,
        repeats=args.repeats,
        peers=args.peers,
        backend=args.backend,
        compile=args.compile,
        progress=lambda s: print(f"[bench] {s}", file=sys.stderr, flush=True),
    )
    out = write_outputs(res, args.out)
    print(markdown_table(res))
    for w in res.warnings:
        print(f"nanogpt bench: warning: {w}", file=sys.stderr)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'} ({res.seconds:.0f} s)")
    return 0
