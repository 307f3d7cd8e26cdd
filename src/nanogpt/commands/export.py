"""The `nanogpt export` command: a checkpoint -> a Hugging Face folder (`nanogpt.export.hf.export`), maybe
pushed, or a GGUF file for llama.cpp, Ollama and LM Studio (`nanogpt.export.gguf.export_gguf`).

nanogpt export --model runs/demo --out exports/demo [--format remote-code|gpt2] [--push-to-hub me/demo]
nanogpt export --model runs/demo --out exports/demo.gguf --format gguf [--outtype f32|f16|q8_0]
nanogpt export --model runs/lora --out exports/lora-adapter --adapter-only [--format remote-code|gpt2]

A LoRA run exports merged into its base (W + B @ A * alpha / r) unless --adapter-only asks for a PEFT folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from nanogpt.errors import ArgumentParser, UserError
from nanogpt.export.gguf import OUTTYPES, export_gguf
from nanogpt.export.hf import FORMATS, export, hub_token, push_to_hub
from nanogpt.export.model_card import BenchTable
from nanogpt.export.peft import export_adapter

GGUF_DEFAULT_OUTTYPE = "f16"  # llama.cpp's converter's default too


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="nanogpt export", description="write a Hugging Face folder or a GGUF file from a checkpoint"
    )
    p.add_argument("--model", required=True, help="a run folder or checkpoint folder")
    p.add_argument(
        "--out", required=True, help="the folder to write (gguf: a FILE.gguf, or a folder for model.gguf)"
    )
    p.add_argument(
        "--format",
        choices=(*FORMATS, "gguf"),
        default="remote-code",
        help="remote-code (default), gpt2 (native) or gguf (llama.cpp, Ollama, LM Studio)",
    )
    p.add_argument(
        "--outtype",
        choices=OUTTYPES,
        help=f"gguf only: the weights' type (default: {GGUF_DEFAULT_OUTTYPE}; norms and biases stay f32)",
    )
    p.add_argument("--force", action="store_true", help="replace --out even if nanogpt did not write it")
    p.add_argument(
        "--bench", metavar="DIR", help="a `nanogpt bench --out DIR` of this model: its table goes in the card"
    )
    p.add_argument(
        "--eval",
        metavar="FILE",
        help="a `nanogpt eval --json` result of this model: its figures go in the card",
    )
    p.add_argument(
        "--push-to-hub", metavar="REPO", help="also upload the folder to this Hub repo (token: HF_TOKEN)"
    )
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="a LoRA run: write its adapters as a PEFT folder (adapter_config.json + adapter_model.safetensors) "
        "for the --format export of its base, instead of the merged weights",
    )
    args = p.parse_args(argv)
    if args.adapter_only:
        return _adapter(args)
    if args.format == "gguf":
        return _gguf(args)
    if args.outtype is not None:
        raise UserError(f"--outtype is for --format gguf only; drop it for --format {args.format}")
    token = hub_token() if args.push_to_hub else None  # fail before the work, not after
    bench = read_bench_table(args.bench) if args.bench is not None else None
    held_out = read_eval(args.eval) if args.eval is not None else None
    res = export(
        args.model, args.out, args.format, args.force, bench, repo=args.push_to_hub, held_out=held_out
    )
    print(
        f"wrote {res.out} ({res.format}): {res.counts.total:,} parameters "
        f"({res.counts.unique:,} unique), files: {', '.join(res.files)}"
    )
    for note in res.notes:
        print(f"note: {note}")
    if args.push_to_hub and token:
        print(f"pushed to {push_to_hub(res.out, args.push_to_hub, token)}")
    return 0


def read_eval(path: str) -> dict[str, Any]:
    """`--eval FILE`: the one JSON object `nanogpt eval --json` printed, checked before any work."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"--eval {path} is not readable JSON ({e}); pass the output of `nanogpt eval --json`"
        ) from None
    if not isinstance(result, dict) or not isinstance(result.get("perplexity"), (int, float)):
        raise UserError(f"--eval {path} holds no perplexity; pass the output of `nanogpt eval --json`")
    return result


def read_bench_table(path: str) -> BenchTable:
    """`--bench DIR`: the table a `nanogpt bench --out DIR` wrote (or its bench.json), read here so that
    `export` takes it as data and never imports the bench."""
    from nanogpt.bench.run import load_bench, markdown_table

    res = load_bench(path)
    return BenchTable(source=path, config=res.config, markdown=markdown_table(res))


def _adapter(args: argparse.Namespace) -> int:
    for flag, value in (
        ("--bench", args.bench),
        ("--eval", args.eval),
        ("--push-to-hub", args.push_to_hub),
        ("--outtype", args.outtype),
    ):
        if value is not None:
            raise UserError(f"{flag} does not apply to --adapter-only; drop one of them")
    if args.format == "gguf":
        raise UserError(
            "--adapter-only writes a PEFT folder for remote-code or gpt2; drop it for --format gguf"
        )
    res = export_adapter(args.model, args.out, args.format, args.force)
    print(
        f"wrote {res.out} (PEFT LoRA adapter for a {res.format} export): {res.n_params:,} parameters, files: "
        f"{', '.join(res.files)}; load it on `nanogpt export --model {res.base} --format {res.format}`"
    )
    return 0


def _gguf(args: argparse.Namespace) -> int:
    for flag, value in (("--bench", args.bench), ("--eval", args.eval), ("--push-to-hub", args.push_to_hub)):
        if value is not None:
            raise UserError(f"{flag} is for the Hugging Face formats; drop it for --format gguf")
    res = export_gguf(args.model, args.out, args.outtype or GGUF_DEFAULT_OUTTYPE, args.force)
    f16 = sorted(k for k, v in res.tensor_types.items() if v == "f16" and res.outtype == "q8_0")
    print(
        f"wrote {res.out} (gguf, {res.outtype}): {res.counts.total:,} parameters "
        f"({res.counts.unique:,} unique), {res.size / 2**20:.1f} MiB"
        + (f"; with an Ollama Modelfile beside it in {res.folder}" if res.folder else "")
    )
    if f16:  # q8_0 packs rows in blocks of 32 values
        print(f"kept in f16 (rows not a multiple of 32 values): {', '.join(f16)}")
    for note in res.notes:
        print(f"note: {note}")
    return 0
