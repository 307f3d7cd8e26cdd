"""The `nanogpt import` command: a GPT-2-format or nanogpt Hugging Face folder -> a nanogpt checkpoint.

The work is `nanogpt.export.hf.import_hf`; the module is `import_` because `import` is a keyword.

    nanogpt import --hf exports/demo --out runs/imported
"""

from __future__ import annotations

from nanogpt.errors import ArgumentParser
from nanogpt.export.hf import import_hf


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="nanogpt import",
        description="turn a Hugging Face GPT-2 or nanogpt folder into a nanogpt checkpoint",
    )
    p.add_argument("--hf", required=True, help="a Hugging Face model folder (GPT-2 or a nanogpt export)")
    p.add_argument("--out", required=True, help="the checkpoint folder to write")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not an earlier import")
    args = p.parse_args(argv)
    out = import_hf(args.hf, args.out, args.force)
    print(f"wrote {out}")
    return 0
