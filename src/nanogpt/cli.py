"""`nanogpt <command>`: a thin dispatcher over each command's `main(argv) -> int`.

Command modules are imported only when their command runs, so `nanogpt --help` is instant and an
optional backend (transformers, MLX) is needed only by the commands that use it. A `UserError` prints
as one line on stderr with exit code 2; `--debug` (anywhere on the line) shows the traceback instead.

    nanogpt info --preset card
"""

from __future__ import annotations

import importlib
import sys

from nanogpt.errors import UserError

# command -> (module, function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": (
        "nanogpt.commands.demo",
        "main",
        "the main job: prepare the builtin corpus, train, evaluate, export, sample",
    ),
    "prepare": (
        "nanogpt.commands.prepare",
        "main",
        "turn a corpus (builtin, text, JSONL, Parquet, HF dataset) into token shards",
    ),
    "train": ("nanogpt.commands.train", "main", "train a model (CPU, CUDA, torchrun DDP); resumable"),
    "eval": ("nanogpt.commands.eval", "main", "held-out perplexity and bits per byte of a checkpoint"),
    "sample": ("nanogpt.commands.sample", "main", "generate text from a checkpoint (KV cache, streaming)"),
    "distill": ("nanogpt.commands.distill", "main", "knowledge distillation from a local or API teacher"),
    "serve": (
        "nanogpt.commands.serve",
        "main",
        "an OpenAI-compatible HTTP server for a checkpoint (127.0.0.1)",
    ),
    "export": (
        "nanogpt.commands.export",
        "main",
        "write a Hugging Face folder (remote-code or native GPT-2) or a GGUF file (llama.cpp)",
    ),
    "import": (
        "nanogpt.commands.import_",
        "main",
        "a GPT-2-format or remote-code HF folder -> a nanogpt checkpoint",
    ),
    "bench": (
        "nanogpt.commands.bench",
        "main",
        "the card's benchmark table, measured (optionally vs HF GPT-2)",
    ),
    "info": ("nanogpt.commands.info", "main", "print a config's network, parameter counts and weight memory"),
    "recipe": (
        "nanogpt.commands.recipe",
        "main",
        "the card's pipeline from one recipe file: prepare, train, distill, eval, bench, export; resumable",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
        print("usage: nanogpt [--debug] <command> [options]\n\ncommands:\n" + "\n".join(lines))
        print("\n`nanogpt <command> --help` shows a command's options.")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from nanogpt import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"nanogpt: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from nanogpt.kernels.device import tune_cpu_allocator

    tune_cpu_allocator()
    try:
        module_name, function, _ = COMMANDS[name]
        return int(getattr(importlib.import_module(module_name), function)(rest) or 0)
    except UserError as e:
        if debug:
            raise
        print(f"nanogpt {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a command may say how to continue (train: resume or start over)
        print(f"nanogpt {name}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
