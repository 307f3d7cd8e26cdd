"""A/B runs of `nanogpt demo`'s training at equal wall time: which lever buys perplexity per minute.

    python scripts/demo_levers.py run WORKDIR ARM [--seed 1337 --minutes 8 --threads 2]
    python scripts/demo_levers.py pair WORKDIR ARM_A ARM_B [ARM_C ...] [--seed 1337 --minutes 8]
    python scripts/demo_levers.py report WORKDIR [--plot docs/demo_time_to_target.png --arms base,...]

`run` is the demo's own pipeline (`run_demo`: calibrate, size the run to the budget, train, held-out
perplexity of best/ on the first 40,000 val tokens) with one arm's changes to the recipe or the model.
`pair` runs two arms (or more) at once, one thread each, so that all see the same machine: an A/B at equal
wall time even when the load drifts. `report` prints a table (mean +- sd over seeds) and draws held-out loss
against wall time with the seed bands. Results: docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# arm -> (TrainConfig changes over the demo's recipe, ModelConfig changes over the `tiny` preset); arms
# join with "+", later ones winning: "old+batch8" is the recipe before docs/demo.md's A/B runs, at batch 8
ARMS: dict[str, tuple[dict, dict]] = {
    "base": ({}, {}),
    "old": ({"batch_size": 16, "learning_rate": 2e-3, "min_lr": 2e-4, "optimizer": "adamw"}, {}),
    "prev": ({"learning_rate": 4e-3, "min_lr": 4e-4}, {}),  # with "unfilled": the recipe before issue #30
    "muon": ({"optimizer": "muon"}, {}),
    "bf16": ({"dtype": "bf16"}, {}),
    "batch8": ({"batch_size": 8}, {}),
    "lr4e-3": ({"learning_rate": 4e-3, "min_lr": 4e-4}, {}),
    "evals8": ({"eval_iters": 8}, {}),
    "deep8": ({}, {"n_layers": 8}),
    "deep6": ({}, {"n_layers": 6}),
    "lr8e-3": ({"learning_rate": 8e-3, "min_lr": 8e-4}, {}),
    "lr1.2e-2": ({"learning_rate": 1.2e-2, "min_lr": 1.2e-3}, {}),
    "batch4": ({"batch_size": 4}, {}),
}
# arm -> the demo's own sizing constants (nanogpt.commands.demo) it changes: "fill" plans with the overhead
# the runs really had, so less of the budget is left unused
SIZING: dict[str, dict[str, float]] = {"fill": {"OVERHEAD": 0.03}, "unfilled": {"OVERHEAD": 0.13}}
# arms that change the code rather than a config: "bf16ns" steps Muon with torch's own `step`, whose
# Newton-Schulz iteration runs in bf16 (emulated on a CPU without bf16 instructions), as before issue #30
CODE = ("bf16ns",)


def run(a: argparse.Namespace) -> None:
    import torch

    from nanogpt.commands import demo
    from nanogpt.commands.demo import run_demo

    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    changes: dict = {}
    model_changes: dict = {}
    for part in a.arm.split("+"):  # "batch8+muon": both levers
        if part not in ARMS and part not in SIZING and part not in CODE:
            sys.exit(f"unknown arm {part!r}; known: {', '.join([*ARMS, *SIZING, *CODE])}")
        if part == "bf16ns":
            from nanogpt.train import optim

            optim.Muon.step = torch.optim.Muon.step  # type: ignore[method-assign]
        for name, value in SIZING.get(part, {}).items():
            setattr(demo, name, value)
        changes |= ARMS.get(part, ({}, {}))[0]
        model_changes |= ARMS.get(part, ({}, {}))[1]
    name = f"{a.arm}_s{a.seed}_t{a.threads}_m{a.minutes:g}"
    load = os.getloadavg()[0]
    t = time.time()
    r = run_demo(
        work / "runs" / name,
        work / "data",
        "tiny",
        a.minutes,
        a.seed,
        export=False,
        progress=False,  # no force: a rerun replaces its own earlier demo folder, never anything else
        changes=changes,
        model_changes=model_changes,
    )
    rec = {
        "arm": a.arm,
        "seed": a.seed,
        "minutes": a.minutes,
        "threads": a.threads,
        "load_before": load,
        "wall_s": time.time() - t,
        "steps": r.steps,
        "tokens": r.tokens,
        "tokens_per_s": r.train_tokens_per_s,
        "ppl": r.final_val_ppl,
        "bpb": r.final_val_bpb,
        "sample": r.samples,
    }
    (work / "results").mkdir(exist_ok=True)
    (work / "results" / f"{name}.json").write_text(json.dumps(rec, indent=1))
    print(f"{name}: ppl {r.final_val_ppl:.1f} after {r.steps} steps ({r.train_tokens_per_s:,.0f} tokens/s)")


def pair(a: argparse.Namespace) -> None:
    from nanogpt.data.prepare import prepare

    prepare("builtin", Path(a.workdir) / "data", verbose=False)  # once, before two runs would race for it
    base = [sys.executable, __file__, "run", a.workdir, "--seed", str(a.seed), "--minutes", str(a.minutes)]
    procs = [subprocess.Popen([*base, arm, "--threads", "1"]) for arm in a.arms]
    if any(p.wait() for p in procs):
        sys.exit("a run failed")


def curve(run: Path) -> list[tuple[float, float]]:
    """(seconds since the start of training, held-out loss) at each eval (step 0 at 0 s)."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    times = {r["step"]: r["elapsed"] for r in rows if "elapsed" in r}
    times[0] = 0.0
    return [(times[r["step"]], r["val_loss"]) for r in rows if "val_loss" in r and r["step"] in times]


def report(a: argparse.Namespace) -> None:
    work = Path(a.workdir)
    recs = [json.loads(p.read_text()) for p in sorted((work / "results").glob("*.json"))]
    groups: dict[tuple, list[dict]] = {}
    for r in recs:
        groups.setdefault((r["arm"], r["threads"], r["minutes"]), []).append(r)
    print("| arm | threads | minutes | seeds | held-out ppl | steps | tokens/s | load before |")
    print("|---|---|---|---|---|---|---|---|")
    for (arm, threads, minutes), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        ppl = [r["ppl"] for r in rs]
        sd = f" ± {statistics.stdev(ppl):.1f}" if len(ppl) > 1 else ""
        loads = ", ".join(f"{r['load_before']:.2f}" for r in rs)
        print(
            f"| {arm} | {threads} | {minutes:g} | {len(rs)} | {statistics.fmean(ppl):.1f}{sd} "
            f"| {statistics.fmean(r['steps'] for r in rs):.0f} | {statistics.fmean(r['tokens_per_s'] for r in rs):,.0f} "
            f"| {loads} |"
        )
    if a.plot:
        plot(work, recs, a.arms.split(",") if a.arms else None, a.threads, Path(a.plot))


def plot(work: Path, recs: list[dict], arms: list[str] | None, threads: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5))
    for arm in arms or sorted({r["arm"] for r in recs}):
        rs = [r for r in recs if r["arm"] == arm and r["threads"] == threads]
        if not rs:
            continue
        curves = [curve(work / "runs" / f"{arm}_s{r['seed']}_t{threads}_m{r['minutes']:g}") for r in rs]
        grid = np.linspace(0, min(c[-1][0] for c in curves), 60)
        ys = np.array([np.interp(grid, [t for t, _ in c], [v for _, v in c]) for c in curves])
        (line,) = ax.plot(grid / 60, ys.mean(0), label=f"{arm} ({len(rs)} seeds)")
        if len(rs) > 1:
            sd = ys.std(0, ddof=1)
            ax.fill_between(grid / 60, ys.mean(0) - sd, ys.mean(0) + sd, color=line.get_color(), alpha=0.2)
    ax.axhline(math.log(200), color="gray", ls="--", lw=0.8, label="perplexity 200")
    ax.set_xlabel("training wall time (min)")
    ax.set_ylabel("held-out loss (nats, in-run eval)")
    ax.set_ylim(top=8)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"nanogpt demo, tiny preset, {threads} thread(s): held-out loss against wall time")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("workdir")
    r.add_argument(
        "arm", help=f"one of {', '.join([*ARMS, *SIZING, *CODE])}, or several joined by + (batch8+muon)"
    )
    r.add_argument("--seed", type=int, default=1337)
    r.add_argument("--minutes", type=float, default=8.0)
    r.add_argument("--threads", type=int, default=2)
    q = sub.add_parser("pair")
    q.add_argument("workdir")
    q.add_argument("arms", nargs="+", help="two arms (or more: each then gets a share of the cores)")
    q.add_argument("--seed", type=int, default=1337)
    q.add_argument("--minutes", type=float, default=8.0)
    s = sub.add_parser("report")
    s.add_argument("workdir")
    s.add_argument("--plot")
    s.add_argument("--arms", help="comma list of arms to draw (default: all)")
    s.add_argument("--threads", type=int, default=2, help="draw the runs made with this many threads")
    a = p.parse_args()
    {"run": run, "pair": pair, "report": report}[a.command](a)


if __name__ == "__main__":
    main()
