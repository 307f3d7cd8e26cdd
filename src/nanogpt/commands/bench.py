"""The `nanogpt bench` command: the model card's benchmark table for a checkpoint or a preset, written out.

The rows are measured by `nanogpt.bench.run.run_bench`; this module reads the flags, loads or builds the
model, checks every setting before the output folder is made, and prints the table. With `--serve` it
load-tests `nanogpt serve` instead (`nanogpt.bench.serving`): a server subprocess, streaming clients at
each `--concurrency`, and HF's static-batch `generate` at the same sizes.

    nanogpt bench --preset card --peers --out bench/
    nanogpt bench --serve --preset card --concurrency 1,4,16,32 --serve-args="--max-batch 32"
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nanogpt.bench.run import (
    check_int8_peers,
    check_settings,
    make_out_dir,
    markdown_table,
    run_bench,
    write_outputs,
)
from nanogpt.bench.serving import DEFAULT_CONCURRENCY
from nanogpt.bench.workloads import activation_method
from nanogpt.commands.options import add_backend, add_device, add_dtype, add_threads, apply_threads
from nanogpt.config import PRESETS, ModelConfig, preset
from nanogpt.errors import ArgumentParser, UserError
from nanogpt.kernels.device import resolve_device
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import load_model

if TYPE_CHECKING:  # the serving modules load only for --serve
    from nanogpt.bench.serving import ServeSettings


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="nanogpt bench",
        description="The model card's benchmark table, each row measured for what it says.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a checkpoint or run folder")
    src.add_argument("--preset", choices=list(PRESETS), help="a named config, random init (default: card)")
    add_backend(p, help="whose rows to measure")
    add_dtype(
        p,
        help="fp32, or bf16/fp16 autocast, or int8 weights (inference rows, against bf16 and fp32)",
        int8=True,
    )
    add_device(p)
    p.add_argument("--peers", action="store_true", help="also run HF GPT2LMHeadModel at the same shapes")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile both models for the training and forward rows"
    )
    p.add_argument(
        "--out", default="bench", help="folder for bench.json, bench.md, bench.png (default: bench)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row after one warm-up (default: 3)")
    p.add_argument("--batch", type=int, help="sequences per batch (default: 4, the card's)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: 512, the card's)")
    add_threads(p)
    p.add_argument(
        "--distill-memory",
        action="store_true",
        help="only the distillation memory row: peak memory of --repeats `distill` steps (a same-size local "
        "teacher) against as many `train` steps at --batch x --seq (default 12 x 512, the card's), in "
        "--backend",
    )
    p.add_argument(
        "--compiled-decode",
        action="store_true",
        help="only the compiled decode rows: batch-1 greedy decode eager and through torch.compile "
        "(`sample --compile`), alternating, with the compile time apart; written to OUT/compiled_decode.*",
    )
    add_serve_flags(p.add_argument_group("load test of `nanogpt serve` (--serve)"))
    return p


def distill_memory_main(args: argparse.Namespace) -> int:
    """`bench --distill-memory`: the row, printed and written to OUT/distill_memory.{json,md}."""
    from nanogpt.bench.distill_memory import distill_memory, markdown

    if args.model:
        raise UserError("--distill-memory measures a preset's size; pass --preset instead of --model")
    cfg = preset(args.preset or "card")
    batch, seq = args.batch or 12, args.seq or cfg.context_length
    make_out_dir(args.out)
    result = distill_memory(cfg, batch, seq, steps=args.repeats, threads=args.threads, backend=args.backend)
    out = Path(args.out)
    (out / "distill_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "distill_memory.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def bench_model(args: argparse.Namespace, device: torch.device) -> NanoGPTLMHeadModel:
    """--model's checkpoint, or --preset's config (the card's by default) with seeded random weights."""
    if args.model:
        return load_model(args.model, device)
    torch.manual_seed(0)
    return NanoGPTLMHeadModel(preset(args.preset or "card")).to(device)


def compiled_decode_main(args: argparse.Namespace) -> int:
    """`bench --compiled-decode`: the rows, printed and written to OUT/compiled_decode.{json,md}."""
    from nanogpt.bench.compiled_decode import compiled_decode, markdown

    for flag, bad in (("--backend mlx", args.backend == "mlx"), ("--peers", args.peers)):
        if bad:
            raise UserError(
                f"{flag} does not apply to --compiled-decode (our torch decode, two ways); drop it"
            )
    if args.dtype == "int8":
        raise UserError("--compiled-decode compiles the fp32, bf16 or fp16 step; pass one of them to --dtype")
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats} must be at least 1; e.g. --repeats 3")
    device = resolve_device(args.device)
    if device.type != "cpu":
        raise UserError(
            f"--compiled-decode measures the CPU step (inductor's C++ code); drop --device {args.device}"
        )
    model = bench_model(args, device)
    make_out_dir(args.out)
    result = compiled_decode(model, args.dtype, args.repeats)
    out = Path(args.out)
    (out / "compiled_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "compiled_decode.md").write_text(markdown(result))
    print(markdown(result), end="")
    return 0


def add_serve_flags(s: argparse._ArgumentGroup) -> None:
    """The flags of `bench --serve`, the load test of a `nanogpt serve` subprocess."""
    s.add_argument(
        "--serve",
        action="store_true",
        help="load-test a `nanogpt serve` subprocess at each --concurrency, beside HF's static-batch generate",
    )
    s.add_argument(
        "--concurrency",
        type=levels,
        default=DEFAULT_CONCURRENCY,
        metavar="C1,C2,...",
        help="client counts, one level each (default: 1,4,16,32)",
    )
    s.add_argument(
        "--requests-per-client", type=int, default=4, metavar="N", help="requests each client sends in turn"
    )
    s.add_argument(
        "--prompt-tokens",
        type=token_range,
        default=(16, 256),
        metavar="LO:HI",
        help="prompt lengths, drawn per request (default: 16:256)",
    )
    s.add_argument(
        "--max-tokens",
        type=token_range,
        default=(64, 256),
        metavar="LO:HI",
        help="max_tokens, drawn per request; HF generates their mean per row (default: 64:256)",
    )
    s.add_argument(
        "--serve-args",
        default="",
        metavar="ARGS",
        help='extra `nanogpt serve` flags, e.g. --serve-args="--max-batch 32 --dtype bf16" (default: none)',
    )
    s.add_argument(
        "--seed", type=int, default=0, help="seed of the requests and of the random weights (default: 0)"
    )
    s.add_argument("--json", metavar="PATH", help="results as JSON (default: OUT/serve.json)")
    s.add_argument("--plot", metavar="PATH", help="throughput and latency plot (default: OUT/serve.png)")


def levels(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated concurrency levels, e.g. 1,4,16,32."""
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every level must be >= 1")
    return out


def token_range(text: str) -> tuple[int, int]:
    """An argparse type: LO:HI (inclusive) or N (= N:N)."""
    lo, _, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LO:HI or N (token counts)") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"{text!r} needs 1 <= LO <= HI")
    return a, b


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args)
    if args.serve:
        return serve_main(args)
    if args.distill_memory:
        return distill_memory_main(args)
    if args.compiled_decode:
        return compiled_decode_main(args)
    device = resolve_device(args.device)
    args.batch = 4 if args.batch is None else args.batch
    args.seq = 512 if args.seq is None else args.seq
    model = bench_model(args, device)
    seq = min(args.seq, model.config.context_length)
    check_settings(model.config, args.batch, seq, args.repeats, 1, args.dtype, args.backend, args.compile)
    check_int8_peers(args.dtype, args.peers)
    if args.dtype != "int8":  # the int8 table has no training or activation rows
        activation_method(device, args.backend)  # refuses what this machine cannot measure
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


def check_serve_flags(args: argparse.Namespace) -> None:
    """The table's flags that `--serve` cannot honour, refused before any work."""
    for flag, bad in (
        ("--backend mlx", args.backend == "mlx"),
        ("--compile", args.compile),
        ("--batch", args.batch is not None),
        ("--seq", args.seq is not None),
    ):
        if bad:
            raise UserError(f"{flag} does not apply to --serve (it measures the server as it runs); drop it")
    if args.dtype != "fp32":
        raise UserError(
            f'--dtype {args.dtype} with --serve: pass the server\'s dtype as --serve-args="--dtype {args.dtype}" '
            "(HF's static batch runs fp32)"
        )


def serve_main(args: argparse.Namespace) -> int:
    """`nanogpt bench --serve`: check the flags, make or find the checkpoint, run the levels, report."""
    from nanogpt.bench.loadgen import parse_serve_args
    from nanogpt.bench.serving import (
        ServeSettings,
        check_serve_settings,
        plot_serving,
        report,
        run_serving,
        write_json,
    )

    check_serve_flags(args)
    device = resolve_device(args.device)
    settings = ServeSettings(
        concurrency=args.concurrency,
        requests_per_client=args.requests_per_client,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        repeats=args.repeats,
        seed=args.seed,
        threads=torch.get_num_threads(),
        serve_args=tuple(parse_serve_args(args.serve_args)),
        device=str(device),
    )
    out = Path(args.out)
    json_path = Path(args.json) if args.json else out / "serve.json"
    plot_path = Path(args.plot) if args.plot else out / "serve.png"
    say = lambda s: print(f"[bench] {s}", file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="nanogpt-bench-serve-") as tmp:
        model_dir, cfg, weights = serve_model(args, settings, Path(tmp))
        check_serve_settings(cfg, settings)
        make_parents((("--json", json_path), ("--plot", plot_path)))  # before minutes of measurement
        log = json_path.with_name(json_path.stem + ".server.log")
        say(f"serving {weights}; server log: {log}")
        res = run_serving(model_dir, cfg, settings, device, log, weights=weights, progress=say)
    write_json(res, json_path)
    plot_serving(res, plot_path)
    print(report(res), end="")
    print(f"wrote {json_path}, {plot_path}, {log} ({res['seconds']:.0f} s)")
    return 0


def serve_model(args: argparse.Namespace, settings: ServeSettings, tmp: Path) -> tuple[str, ModelConfig, str]:
    """The checkpoint `--serve` serves (`--model`, or a preset's random weights saved under `tmp`), its
    config, and the words the report uses for its weights."""
    from nanogpt.bench.serving import check_serve_settings, random_checkpoint

    if args.model:
        model_dir = args.model
        cfg = load_model(args.model).config  # refuses a folder without a checkpoint, in one line
        weights = f"checkpoint {args.model}"
    else:
        name = args.preset or "card"
        cfg = preset(name)
        check_serve_settings(cfg, settings)
        model_dir = str(random_checkpoint(cfg, tmp / name, seed=args.seed))
        weights = (
            f"preset {name}, random init (seed {args.seed}), end-of-text output row zeroed so greedy "
            "decoding runs to max_tokens: speed only, the text is meaningless"
        )
    return model_dir, cfg, weights


def make_parents(paths: tuple[tuple[str, Path], ...]) -> None:
    """The folder of each (flag, path), created now, or a one-line refusal naming the flag."""
    for flag, path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"{flag} {path}: its folder cannot be made ({e.strerror}); pass another path"
            ) from None
