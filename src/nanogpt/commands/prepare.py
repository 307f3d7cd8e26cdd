"""The `nanogpt prepare` command: a corpus -> a prepared data folder of token shards (`nanogpt.data.prepare`).

nanogpt prepare --source hf:HuggingFaceFW/fineweb-edu:sample-10BT --max-tokens 10M --out data/fineweb
"""

from __future__ import annotations

import argparse
import math

from nanogpt.data.prepare import prepare
from nanogpt.data.sources import BUILTIN
from nanogpt.errors import ArgumentParser, UserError


def parse_count(text: str) -> int:
    """A positive token count written as 100000, 100_000, 10M, 1.5K or 1e7."""
    s = text.strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(s[-1:], 1)
    if scale != 1:
        s = s[:-1]
    try:
        value = float(s) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count such as 10M or 500000") from None
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive whole token count such as 10M or 500000"
        )
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="nanogpt prepare",
        description="Turn a corpus into a prepared data folder of token shards (train/val held out by "
        "document). The val split is never empty: a source that is one document (a single .txt file) gives "
        "val the tail of its tokens (max(--val-fraction, 513 tokens)), and says so; one shorter than 1026 "
        "tokens is refused.",
    )
    p.add_argument(
        "--source",
        default=BUILTIN,
        help="'builtin' (default, offline), a .txt/.jsonl/.jsonl.gz/.parquet file or a folder of them, "
        "or hf:NAME[:CONFIG] (e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT; NAME may be a folder written by "
        "datasets' save_to_disk)",
    )
    p.add_argument("--out", help="output folder (default: data/<source name>)")
    p.add_argument(
        "--text-field", default="text", help="the JSONL field / Parquet column / dataset column with text"
    )
    p.add_argument("--split", default="train", help="the split of an hf: dataset to read (default: train)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="share of documents held out for val (of tokens, for a single document)",
    )
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val assignment")
    p.add_argument("--max-tokens", type=parse_count, help="stop after this many tokens in all (e.g. 10M)")
    p.add_argument(
        "--shard-tokens", type=parse_count, default=100_000_000, help="tokens per shard (default 100M)"
    )
    p.add_argument(
        "--errors",
        choices=["strict", "replace"],
        default="strict",
        help="invalid UTF-8 in text/JSONL files: stop with an error, or replace the bad bytes",
    )
    chat = p.add_argument_group(
        "chat and completions data",
        'a .jsonl of {"messages": [{"role", "content"}, ...]} or {"prompt", "completion"} records (mlx-lm\'s '
        "formats) becomes conversations in the chat template with a loss mask: only the assistant's replies "
        "(or completions) and their <|endoftext|> are trained",
    )
    chat.add_argument(
        "--train-on-prompt", action="store_true", help="train on every token, prompts included (no mask)"
    )
    chat.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave malformed or too long records out (and count them) instead of stopping at the first",
    )
    chat.add_argument(
        "--context-length",
        type=int,
        help="the context the conversations are trained in (default 512, the card's): a longer one is refused",
    )
    p.add_argument("--force", action="store_true", help="rebuild the folder even if it is already prepared")
    p.add_argument("--quiet", action="store_true", help="no progress bar or notes on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.context_length is not None and args.context_length < 1:
        raise UserError(f"--context-length {args.context_length} must be positive; e.g. --context-length 512")
    result = prepare(
        args.source,
        args.out,
        text_field=args.text_field,
        split=args.split,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_tokens=args.max_tokens,
        shard_tokens=args.shard_tokens,
        errors=args.errors,
        force=args.force,
        verbose=not args.quiet,
        train_on_prompt=args.train_on_prompt,
        skip_bad=args.skip_bad,
        context_length=args.context_length,
    )
    print(result.summary())
    return 0
