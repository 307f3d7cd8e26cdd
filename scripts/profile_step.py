"""Profile the bench's training step (forward + backward + AdamW) of a config and print where the time goes.

    python scripts/profile_step.py --preset card --device cuda --dtype bf16 --compile --batch 12
    python scripts/profile_step.py --preset tiny --batch 8 --optimizer muon     # the demo's step

Warms up (compilation included), then records `--steps` steps with torch.profiler and prints the ops
sorted by self time (CUDA time on a GPU), and the wall time per step with and without the profiler.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from nanogpt.bench.workloads import Inputs, TorchRunner
from nanogpt.config import PRESETS, preset
from nanogpt.kernels.device import resolve_device, tune_cpu_allocator
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.optim import make_optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="card", choices=list(PRESETS))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=20, help="ops to print")
    args = p.parse_args()

    tune_cpu_allocator()
    device = resolve_device(args.device)
    cfg = preset(args.preset)
    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(cfg).to(device)
    inp = Inputs.make(cfg, args.batch, cfg.context_length, 1)
    runner = TorchRunner(model, inp, args.dtype, device, args.compile)
    if args.optimizer != runner.tcfg.optimizer:  # the bench's runner trains with the card's AdamW
        runner.tcfg = replace(runner.tcfg, optimizer=args.optimizer)
        runner.opt = make_optimizer(model, runner.tcfg, device)
    step = runner.train

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    plain = (time.perf_counter() - t) / args.steps
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        profiled = (time.perf_counter() - t) / args.steps
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=48))
    tokens = args.batch * cfg.context_length
    print(
        f"{args.preset} {device} {args.dtype} compile={args.compile} batch {args.batch} x {cfg.context_length}: "
        f"{plain * 1e3:.1f} ms/step ({tokens / plain:,.0f} tokens/s), {profiled * 1e3:.1f} ms/step profiled"
    )


if __name__ == "__main__":
    main()
