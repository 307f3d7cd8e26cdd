"""The options several commands share: `--device`, `--dtype`, `--backend`, `--threads`, `--tracker`, added in
one way.

Each helper adds its flag with the same values and the same meaning wherever it appears, so
`--dtype fp16` or `--device auto` is never accepted by one command and refused by the next. A command
that cannot run one of the values refuses it with one line (`refuse_mlx_dtype`), not with another list.

    add_device(p); add_dtype(p); add_backend(p); add_threads(p); add_tracker(p)
"""

from __future__ import annotations

import argparse

from nanogpt.config import DTYPE_NAMES
from nanogpt.errors import UserError
from nanogpt.kernels.device import set_threads

# an ArgumentParser or one of its argument groups
Options = argparse.ArgumentParser | argparse._ArgumentGroup

BACKENDS = ("torch", "mlx")
DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps"


INFERENCE_DTYPES = (*DTYPE_NAMES, "int8")  # int8: weight-only, for sample/serve/eval/bench (kernels/quant.py)


def dtype_name(text: str, names: tuple[str, ...] = DTYPE_NAMES) -> str:
    """An argparse type: one of `names` (a type, not `choices`, so the error names the fix)."""
    if text not in names:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; use one of {', '.join(names)}")
    return text


def add_device(p: Options, default: str | None = "auto", help: str = DEVICE_HELP) -> None:
    """`--device`: where to run; `auto` is cuda if available, else mps, else cpu (`resolve_device`)."""
    p.add_argument("--device", default=default, metavar="DEVICE", help=help)


def add_dtype(
    p: Options,
    default: str | None = "fp32",
    help: str = "autocast precision",
    flag: str = "--dtype",
    int8: bool = False,
) -> None:
    """`--dtype` (or `flag`): fp32, or bf16/fp16 autocast, the same in every command; with `int8` (the
    inference commands) also weight-only int8 (`nanogpt.kernels.quant.apply_dtype`)."""
    names = INFERENCE_DTYPES if int8 else DTYPE_NAMES
    metavar = "{" + ",".join(names) + "}"
    p.add_argument(flag, type=lambda t: dtype_name(t, names), default=default, metavar=metavar, help=help)


def add_backend(p: Options, help: str = "PyTorch or Apple MLX (fp32)") -> None:
    """`--backend torch|mlx`: which framework runs the model (MLX is imported only when chosen)."""
    p.add_argument("--backend", choices=BACKENDS, default="torch", help=help)


def add_threads(p: Options, help: str = "torch CPU threads (default: torch's choice)") -> None:
    """`--threads N`; `apply_threads` checks it and passes it to `nanogpt.kernels.device.set_threads`."""
    p.add_argument("--threads", type=int, metavar="N", help=help)


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads from `--threads` (None keeps torch's choice; <= 0 is one-line refused)."""
    if args.threads is not None and args.threads <= 0:
        raise UserError(
            f"--threads {args.threads} must be a whole number > 0 (the CPU threads to use); omit it for all cores"
        )
    set_threads(args.threads)


def refuse_mlx_dtype(args: argparse.Namespace) -> None:
    """The MLX backend runs fp32 only: any other `--dtype` is refused before any work."""
    if args.backend == "mlx" and args.dtype != "fp32":
        raise UserError(f"--backend mlx runs fp32 only; drop --dtype {args.dtype}")


def add_tracker(p: Options) -> None:
    """`--tracker NAME` (repeatable, or a comma list): mirror the run's log to experiment trackers.

    The values are checked by `nanogpt.train.tracking.parse_trackers`; unset (None) means "on resume, the
    trackers the run used, else none".
    """
    p.add_argument(
        "--tracker",
        action="append",
        metavar="NAME",
        help="log to tensorboard, wandb and/or mlflow (repeat or comma list; `none` turns them off; "
        "default: none, or the run's own on --resume)",
    )
