"""The `nanogpt export` command: a checkpoint -> a Hugging Face folder (`nanogpt.export.hf.export`), maybe pushed.

nanogpt export --model runs/demo --out exports/demo [--format remote-code|gpt2] [--push-to-hub me/demo]
"""

from __future__ import annotations

from nanogpt.errors import ArgumentParser
from nanogpt.export.hf import FORMATS, export, hub_token, push_to_hub


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="nanogpt export", description="write a Hugging Face folder from a checkpoint")
    p.add_argument("--model", required=True, help="a run folder or checkpoint folder")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument(
        "--format", choices=FORMATS, default="remote-code", help="remote-code (default) or gpt2 (native)"
    )
    p.add_argument("--force", action="store_true", help="replace --out even if nanogpt did not write it")
    p.add_argument(
        "--bench", metavar="DIR", help="a `nanogpt bench --out DIR` of this model: its table goes in the card"
    )
    p.add_argument(
        "--push-to-hub", metavar="REPO", help="also upload the folder to this Hub repo (token: HF_TOKEN)"
    )
    args = p.parse_args(argv)
    token = hub_token() if args.push_to_hub else None  # fail before the work, not after
    res = export(args.model, args.out, args.format, args.force, args.bench)
    print(
        f"wrote {res.out} ({res.format}): {res.counts.total:,} parameters "
        f"({res.counts.unique:,} unique), files: {', '.join(res.files)}"
    )
    if args.push_to_hub and token:
        print(f"pushed to {push_to_hub(res.out, args.push_to_hub, token)}")
    return 0
