"""The `nanogpt eval` command: held-out perplexity and bits per byte of a checkpoint, in either backend.

The measurement is `nanogpt.infer.evaluate.sliding_window_nll` (`nanogpt.mlx.evaluate`'s with
`--backend mlx`); this module reads the flags, picks the backend and prints the result. By default each
document is scored on its own, as lm-evaluation-harness's `loglikelihood_rolling` does (same windows,
same bytes: its bits_per_byte on the same text); `--stream` scores the `<|endoftext|>`-joined stream. A chat
folder (`prepare` of chat or prompt/completion JSONL) is scored as fine-tuning trains it: each conversation
whole, on its assistant tokens only (`--stream` scores all its tokens instead).

    nanogpt eval --model runs/demo --data data/builtin --split val --stride 256
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from nanogpt.commands.options import add_backend, add_device, add_dtype, refuse_mlx_dtype
from nanogpt.data.shards import split_conversations
from nanogpt.errors import ArgumentParser, UserError, flags_for_settings
from nanogpt.infer.evaluate import EvalResult, conversation_nll, sliding_window_nll, split_tokens, text_tokens
from nanogpt.kernels.device import resolve_device
from nanogpt.kernels.quant import apply_dtype
from nanogpt.train.checkpoint import load_model

# the flag of each setting the evaluator names in a refusal (`SettingError.with_flags`)
FLAGS = {
    "context": "--context",
    "stride": "--stride",
    "batch_size": "--batch-size",
    "max_tokens": "--max-tokens",
    "data": "--data",
    "text": "--text",
    "text_field": "--text-field",
    "per_document=False": "--stream",
}


def format_result(r: EvalResult) -> str:
    how = "one stream"
    if r.mode == "documents":
        how = f"{r.documents:,} documents, each on its own"
    elif r.mode == "conversations":
        how = f"the assistant tokens of {r.documents:,} conversations, each whole"
    return "\n".join(
        [
            f"tokens scored: {r.tokens_scored:,} ({how}; context {r.context}, stride {r.stride}, {r.n_bytes:,} bytes)",
            f"mean NLL:      {r.mean_nll:.4f} nats/token",
            f"perplexity:    {r.perplexity:.2f}",
            f"bits per byte: {r.bits_per_byte:.4f}",
            f"speed:         {r.tokens_per_s:,.0f} tokens/s ({r.seconds:.1f} s)",
        ]
    )


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="nanogpt eval", description="Held-out perplexity and bits per byte of a checkpoint."
    )
    p.add_argument("--model", required=True, help="a checkpoint or run folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="a prepared data folder (`nanogpt prepare`)")
    src.add_argument("--text", help="a UTF-8 text file, or a .jsonl file of documents")
    p.add_argument("--split", default="val", help="split of --data to score (default: val)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens from the start")
    p.add_argument("--context", type=int, help="window length (default: the model's context_length)")
    p.add_argument(
        "--stride", type=int, help="window step; smaller = more history per token (default: context)"
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="score the documents joined by <|endoftext|> as one stream (separators are targets, 13 bytes "
        "each) instead of each on its own as lm-eval's loglikelihood_rolling does",
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    add_device(p)
    add_dtype(p, help="autocast precision (log-softmax stays fp32), or int8 weights (weight-only)", int8=True)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")
    add_backend(p)
    return p


def main(argv: list[str] | None = None) -> int:
    with flags_for_settings(FLAGS):  # the evaluator names its settings; this command names their flags
        return evaluate(build_parser().parse_args(argv))


def evaluate_chat(
    args: argparse.Namespace, convs: list[tuple[np.ndarray, np.ndarray]], dev: torch.device
) -> int:
    """A chat folder (`prepare` of messages or prompt/completion JSONL): the loss fine-tuning trains, on the
    assistant tokens of whole conversations, one per row."""
    for flag, value in (("--context", args.context), ("--stride", args.stride)):
        if value is not None:
            raise UserError(
                f"{flag} does not apply to the chat folder {args.data}: its conversations are scored whole, "
                "on their assistant tokens; drop it, or add --stream to score every token as one stream"
            )
    if args.max_tokens is not None:  # whole conversations up to that many tokens (at least one)
        sizes = np.cumsum([len(ids) for ids, _ in convs])
        convs = convs[: max(1, int(np.searchsorted(sizes, args.max_tokens, side="right")))]
    progress = not args.no_progress
    if args.backend == "mlx":
        from nanogpt.mlx import load_model as mlx_load_model
        from nanogpt.mlx.evaluate import conversation_nll as mlx_conversation_nll

        result = mlx_conversation_nll(
            mlx_load_model(args.model), convs, batch_size=args.batch_size, progress=progress
        )
    else:
        model = load_model(args.model, dev)
        dtype = apply_dtype(model, args.dtype)
        result = conversation_nll(
            model, convs, batch_size=args.batch_size, device=dev, dtype=dtype, progress=progress
        )
    print(json.dumps(asdict(result)) if args.json else format_result(result))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UserError(f"--max-tokens {args.max_tokens} is too small; perplexity needs at least 2 tokens")
    refuse_mlx_dtype(args)
    dev = resolve_device(args.device)
    # a chat folder is scored by conversation; a file given as --data is refused by split_tokens, below
    chat = bool(args.data) and not args.stream and Path(args.data).is_dir()
    convs = split_conversations(args.data, args.split) if chat else None
    if convs is not None:
        return evaluate_chat(args, convs, dev)
    if args.data:
        tokens = split_tokens(args.data, args.split, args.max_tokens)
    else:
        tokens = text_tokens(args.text, args.text_field, args.max_tokens)
    window = {
        "context": args.context,
        "stride": args.stride,
        "batch_size": args.batch_size,
        "progress": not args.no_progress,
        "per_document": not args.stream,
    }
    if args.backend == "mlx":  # imported only here: MLX is optional
        from nanogpt.mlx import load_model as mlx_load_model
        from nanogpt.mlx.evaluate import sliding_window_nll as mlx_sliding_window_nll

        result = mlx_sliding_window_nll(mlx_load_model(args.model), tokens, **window)
    else:
        model = load_model(args.model, dev)
        result = sliding_window_nll(model, tokens, device=dev, dtype=apply_dtype(model, args.dtype), **window)
    print(json.dumps(asdict(result)) if args.json else format_result(result))
    return 0
