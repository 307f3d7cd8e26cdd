"""The model card's benchmark table, with each row measuring exactly what its name says.

The card's table mixes measurements: its "training throughput" was a forward pass only and its
"activation memory" an estimate. Here training throughput is forward + backward + AdamW step (the real
`train.loop` step: fp32 cross-entropy, gradient clipping), forward-only throughput is its own row, decode is
batch 1 with the KV cache (`infer.generate.decode_steps`, greedy), and activation memory is measured: on CUDA
`torch.cuda.max_memory_allocated`; on CPU the peak RSS (VmHWM, reset) of a fresh subprocess during one
forward + backward minus its RSS once weights, gradients and AdamW moments are allocated (glibc's mmap
threshold is pinned so freed tensors leave the RSS). MFU is measured against this machine's own matmul
speed at the model's shapes, and decode against its own copy bandwidth, not a spec-sheet peak.
Every timed row has a warm-up, then `repeats` runs; the value is the median, the spread min..max.
With `--peers` a Hugging Face `GPT2LMHeadModel` of the same shapes (random init, no download) runs the
same rows in the same process, alternating with ours run by run so that machine load hits both alike.

The parts: `workloads` makes a `Runner` per model (what it can be asked to run), `table` lists the rows as
data (a `Workload` per timed measurement) and `measure.run_workloads` times them; this module puts a run
together and writes its outputs.

    write_outputs(run_bench(load_model("runs/demo"), peers=True), "bench/")
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanogpt.bench.measure import (
    MIB,
    NEW_TOKENS,
    PEER_NAME,
    PROMPT_TOKENS,
    Row,
    Stat,
    Timing,
    activation_estimate,
    check_rows,
    decode_step_bytes,
    forward_flops_per_token,
    load_warnings,
    machine_info,
    measure_roofline,
    rate_row,
    run_workloads,
    time_row,
)
from nanogpt.bench.table import (
    accuracy_row,
    efficiency_rows,
    int8_bound_rows,
    int8_decode_group,
    int8_ratio_row,
    int8_workloads,
    memory_rows,
    nll_delta,
    size_rows,
    timed_workloads,
)
from nanogpt.bench.workloads import (
    Inputs,
    MLXRunner,
    PeerRunner,
    Runner,
    TorchRunner,
    activation_method,
    measure_activation_memory,
    peer_model,
)
from nanogpt.config import ModelConfig
from nanogpt.errors import UserError
from nanogpt.kernels.device import torch_dtype
from nanogpt.kernels.quant import quantize_int8
from nanogpt.model.gpt import NanoGPTLMHeadModel

__all__ = [  # what tests and callers reach through this module, besides its own functions
    "NEW_TOKENS",
    "Row",
    "Stat",
    "activation_estimate",
    "check_rows",
    "decode_step_bytes",
    "forward_flops_per_token",
    "load_warnings",
    "rate_row",
    "time_row",
]

# --- the run ------------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    config: dict[str, Any]
    settings: dict[str, Any]
    machine: dict[str, Any]
    roofline: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    activation: dict[str, Any] = field(default_factory=dict)
    load_average: dict[str, list[float]] = field(default_factory=dict)  # os.getloadavg() at start, end
    warnings: list[str] = field(default_factory=list)  # impossible values (left out), a busy machine
    seconds: float = 0.0

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for r, row in zip(d["rows"], self.rows, strict=True):
            r["ratio"] = row.ratio
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        rows = [Row(**{k: v for k, v in r.items() if k != "ratio"}) for r in d["rows"]]  # ratio: derived
        return cls(**{**d, "rows": rows})


def load_bench(path: str | Path) -> BenchResult:
    """A bench run's results from its output folder or its bench.json (what `write_outputs` wrote)."""
    p = Path(path)
    p = p / "bench.json" if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"no bench results at {p}; run `nanogpt bench --model RUN --out DIR` and pass DIR")
    try:
        return BenchResult.from_dict(json.loads(p.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{p} is not a `nanogpt bench` bench.json ({e}); run the bench again") from e


def check_settings(
    cfg: ModelConfig,
    batch: int,
    seq: int,
    repeats: int,
    warmup: int,
    dtype: str,
    backend: str,
    compile: bool = False,
) -> None:
    """One-line errors for settings no bench can run with (the command checks them before writing)."""
    if not 1 <= seq <= cfg.context_length:
        raise UserError(
            f"--seq {seq} is outside 1..{cfg.context_length} (the context); pass a --seq in that range"
        )
    for flag, n, least in (("--batch", batch, 1), ("--repeats", repeats, 1), ("warmup", warmup, 0)):
        if n < least:
            raise UserError(f"{flag} {n} must be at least {least}")
    if dtype != "int8":
        torch_dtype(dtype)
    if backend not in ("torch", "mlx"):
        raise UserError(f"--backend {backend!r} is unknown; use torch or mlx")
    if backend == "mlx" and dtype != "fp32":
        raise UserError(f"--backend mlx measures fp32 only; drop --dtype {dtype}")
    if backend == "mlx" and compile:
        raise UserError("--compile is torch.compile; the mlx backend has no such step, drop --compile")
    if dtype == "int8" and compile:
        raise UserError("--dtype int8 measures the eager int8 kernel; drop --compile")


def check_int8_peers(dtype: str, peers: bool) -> None:
    if dtype == "int8" and peers:
        raise UserError("--dtype int8 compares our int8 decode with our bf16 and fp32 ones; drop --peers")


def run_bench(
    model: NanoGPTLMHeadModel,
    *,
    batch: int = 4,
    seq: int = 512,
    dtype: str = "fp32",
    repeats: int = 3,
    warmup: int = 1,
    peers: bool = False,
    backend: str = "torch",
    eval_windows: int | None = None,
    compile: bool = False,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Every row of the table for `model` (backend="mlx" times its MLX twin), beside HF's with `peers`."""
    say = progress or (lambda _: None)
    t_start = time.perf_counter()
    cfg = model.config
    check_settings(cfg, batch, seq, repeats, warmup, dtype, backend, compile)
    check_int8_peers(dtype, peers)
    device = next(model.parameters()).device
    load0 = list(os.getloadavg())
    timing = Timing(repeats, warmup, device)
    if dtype == "int8":
        return int8_bench(model, Inputs.make(cfg, batch, seq, batch), timing, say, load0, t_start)
    inp = Inputs.make(cfg, batch, seq, eval_windows or batch)
    mlx = MLXRunner(model, inp) if backend == "mlx" else None
    ours: Runner = mlx if mlx is not None else TorchRunner(model, inp, dtype, device, compile)
    peer = peer_model(cfg).to(device) if peers else None
    theirs = PeerRunner(peer, inp, dtype, device, compile) if peer is not None else None

    activation_method(device, backend)  # what cannot be measured is refused now, not after the timed rows
    say(f"roofline: {backend} matmul GFLOP/s at the model's shapes, copy bandwidth")
    roof = measure_roofline(cfg, batch, seq, dtype, device, repeats, backend)
    settings = run_settings(inp, dtype, timing, backend, compile, peer)
    res = BenchResult(cfg.to_dict(), settings, machine_info(device), roof)
    n_unique = model.num_params(unique=True)
    peer_unique = sum(p.numel() for p in peer.parameters()) if peer is not None else None  # tied: once
    res.rows += size_rows(cfg, model.num_params(unique=False), n_unique, peer_unique)
    for w in timed_workloads(ours, theirs, inp):
        say(w.label)
        res.rows += run_workloads([w], timing)
    if dtype != "fp32" and backend == "torch":
        say(f"accuracy: the eval NLL in {dtype} and in fp32")
        fp32 = TorchRunner(model, inp, "fp32", device)
        peer_fp32 = PeerRunner(peer, inp, "fp32", device) if peer is not None else None
        peer_delta = (
            nll_delta(theirs, peer_fp32, seq) if theirs is not None and peer_fp32 is not None else None
        )
        res.rows.append(accuracy_row(dtype, nll_delta(ours, fp32, seq), peer_delta, seq))
    say("activation memory" + (" (fresh processes)" if device.type == "cpu" and backend == "torch" else ""))
    res.activation = activation_memory(cfg, inp, dtype, device, mlx, peers)
    res.rows += memory_rows(cfg, batch, seq, dtype, res.activation["ours"], res.activation["peer"])
    res.rows += efficiency_rows(res.rows, roof, cfg, n_unique, seq, dtype, inp.new_tokens)
    return finish(res, load0, t_start)


def run_settings(
    inp: Inputs,
    dtype: str,
    timing: Timing,
    backend: str = "torch",
    compile: bool = False,
    peer: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """bench.json's `settings`: what was run, on which inputs (the int8 run's lack the TTFT prompt and the
    peer's attention, as its table has no such rows)."""
    int8 = dtype == "int8"
    settings: dict[str, Any] = {
        "batch": inp.batch,
        "seq": inp.seq,
        "dtype": dtype,
        "repeats": timing.repeats,
        "warmup": timing.warmup,
        "backend": backend,
        "compile": compile,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": inp.new_tokens,
        **({} if int8 else {"ttft_prompt_tokens": inp.seq}),
        "eval_tokens": inp.n_eval,
        "inputs": "fixed random token ids",
        "peer": PEER_NAME if peer is not None else None,
    }
    if not int8:
        attn = getattr(peer.config, "_attn_implementation", None) if peer is not None else None
        settings["peer_attn_implementation"] = attn
    return settings


def activation_memory(
    cfg: ModelConfig, inp: Inputs, dtype: str, device: torch.device, mlx: MLXRunner | None, peers: bool
) -> dict[str, Any]:
    """The activation-memory measurements, ours and the peer's (None without one): bench.json's `activation`."""
    args = (cfg, inp.batch, inp.seq, dtype)
    ours = mlx.activation() if mlx is not None else measure_activation_memory(*args, "ours", device)
    peer = measure_activation_memory(*args, "peer", device) if peers else None
    return {"ours": ours, "peer": peer}


def finish(res: BenchResult, load0: list[float], t_start: float) -> BenchResult:
    """Close a run: the load average at its end, its warnings and its duration."""
    res.load_average = {"start": load0, "end": list(os.getloadavg())}
    # a physically impossible number is never written as a result; a busy machine is said, not hidden
    res.warnings = check_rows(res.rows) + load_warnings(
        load0, res.load_average["end"], os.cpu_count() or 1, torch.get_num_threads()
    )
    res.seconds = time.perf_counter() - t_start
    return res


def int8_bench(
    model: NanoGPTLMHeadModel,
    inp: Inputs,
    timing: Timing,
    say: Callable[[str], None],
    load0: list[float],
    t_start: float,
) -> BenchResult:
    """`--dtype int8`: the inference rows of an int8-weight copy of `model`, beside its bf16 and fp32 decode.

    The three decodes alternate run by run (one group of `run_workloads`), so load hits them alike; no
    training, activation or MFU rows (int8 here is weights for inference only); each decode's share of its
    own memory bound; the accuracy row against fp32.
    """
    cfg, device = model.config, timing.device
    qmodel = copy.deepcopy(model)
    quantize_int8(qmodel)  # in place: still our model, its Linear layers int8
    int8 = TorchRunner(qmodel, inp, "fp32", device)
    bf16, fp32 = TorchRunner(model, inp, "bf16", device), TorchRunner(model, inp, "fp32", device)
    say("roofline: matmul GFLOP/s at the model's shapes, copy bandwidth")
    roof = measure_roofline(cfg, inp.batch, inp.seq, "fp32", device, timing.repeats, "torch")
    res = BenchResult(cfg.to_dict(), run_settings(inp, "int8", timing), machine_info(device), roof)
    res.rows += size_rows(cfg, model.num_params(unique=False), model.num_params(unique=True), None)
    res.rows.append(int8_weights_row(qmodel))
    say("decode (batch 1, KV cache, greedy): int8, bf16 and fp32 alternating")
    decode = run_workloads(int8_decode_group(int8, bf16, fp32, inp), timing)
    res.rows += [*decode, int8_ratio_row(decode), *int8_bound_rows(decode, roof, cfg, inp.new_tokens)]
    for w in int8_workloads(int8, inp):
        say(f"{w.label}, int8")
        res.rows += run_workloads([w], timing)
    say("accuracy: the eval NLL with int8 weights and in fp32")
    res.rows.append(accuracy_row("int8", nll_delta(int8, fp32, inp.seq), None, inp.seq))
    return finish(res, load0, t_start)


def int8_weights_row(qmodel: torch.nn.Module) -> Row:
    """The bytes an int8 copy holds: its int8 weights, their scales, and what stayed in float."""
    tensors = {id(t): t for t in [*qmodel.parameters(), *qmodel.buffers()]}.values()
    what = (
        "Weight memory int8: the Linear layers and the tied head / token table int8 (+ a bf16 scale per row)"
    )
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return Row("weights_int8_mib", what, nbytes / MIB, "MiB", higher_is_better=False)


# --- outputs ------------------------------------------------------------------------------------------


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if unit == "fraction":
        return f"{value * 100:.1f}%"
    if unit == "params":
        return f"{value:,.0f}"
    if unit == "s":
        return f"{value:.3f}"
    if unit == "nats":  # a 0 difference of two float32 means: equal to float32's resolution, not exact
        return "0 (equal in float32)" if value == 0 else f"{value:.2e}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _cell(v: float | None, lo: float | None, hi: float | None, unit: str) -> str:
    s = fmt(v, unit)
    if lo is not None and hi is not None and s:
        s += f" ({fmt(lo, unit)}–{fmt(hi, unit)})"
    return s


INVALID = "invalid (see warnings)"


def markdown_table(res: BenchResult) -> str:
    """The card's layout (Metric | Value), with peer and ratio columns when a peer ran."""
    peers = any(r.peer is not None or "peer" in r.invalid for r in res.rows)
    head = "| Metric | Value |" + (f" {PEER_NAME} | Ours / peer |" if peers else "")
    lines = [head, "|" + "---|" * (4 if peers else 2)]
    for r in res.rows:
        value = f"{_cell(r.value, r.lo, r.hi, r.unit)} {r.unit if r.unit != 'fraction' else ''}".rstrip()
        line = f"| {r.metric} | {INVALID if 'ours' in r.invalid else value} |"
        if peers:
            ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
            peer = INVALID if "peer" in r.invalid else _cell(r.peer, r.peer_lo, r.peer_hi, r.unit)
            line += f" {peer} | {ratio} |"
        lines.append(line)
    m, s, la = res.machine, res.settings, res.load_average
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, device {m['device']}"
        + (f" ({m['gpu']})" if m["gpu"] else "")
        + "; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + ".",
        f"Settings: {s['backend']} {s['dtype']}, {s['repeats']} timed repeats after {s['warmup']} warm-up; "
        "value = median (min–max). Load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.2f}' for x in la['start'])}, at end {'/'.join(f'{x:.2f}' for x in la['end'])}.",
        f"Measured matmul GFLOP/s ({res.roofline['backend']} {res.roofline['dtype']}): "
        + ", ".join(f"{k} {v:.1f}" for k, v in res.roofline["matmul_gflops"].items())
        + f"; copy bandwidth {res.roofline['copy_gb_s']:.1f} GB/s.",
    ]
    lines += ["", "Warnings:", *(f"- {w}" for w in res.warnings)] if res.warnings else []
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Bar:
    """One bar of bench.png: a row of the table under its table name, oriented so that right is better."""

    label: str  # the row's metric, as bench.md names it
    value: float  # with a peer: how many times better than it (> 1: ours is better); else our rate
    note: str  # written at the bar's end


@dataclass(frozen=True)
class BenchPlot:
    """What bench.png draws, decided apart from the drawing."""

    bars: list[Bar]
    xlabel: str
    compared: bool  # True: values relative to the peer, bars drawn from 1; False: our own rates


# a row's unit -> what "better" and "worse" are for it (rates and times: speed)
_WORDS = {"tokens/s": ("faster", "slower"), "batches/s": ("faster", "slower"), "s": ("faster", "slower"),
          "MiB": ("less memory", "more memory"), "fraction": ("higher", "lower")}  # fmt: skip


def bench_plot(res: BenchResult) -> BenchPlot:
    """The bars of bench.png. With a peer, each row compared with it and oriented so that right of 1 is better
    for ours (rates: ours/peer; times and memory: peer/ours): a 5x slower time to first token sits left of 1,
    never beside a 5x faster throughput. Without one, our measured rates."""
    bars, seen = [], set()
    for r in res.rows:
        if r.ratio is None or r.ratio <= 0 or r.key.startswith(("params", "weights")):  # sizes: no "better"
            continue
        if r.metric in seen:  # batches/s beside tokens/s: the same measurement, the same ratio
            continue
        seen.add(r.metric)
        better = r.ratio if r.higher_is_better else 1 / r.ratio
        up, down = _WORDS.get(r.unit, ("better", "worse"))
        note = f"{better:.2f}x {up}" if better >= 1 else f"{1 / better:.2f}x {down}"
        bars.append(Bar(r.metric, better, note))
    if bars:
        xlabel = (
            f"nanogpt compared with {PEER_NAME} (log scale): right of 1 = nanogpt better "
            "(rates: ours / peer; times and memory: peer / ours)"
        )
        return BenchPlot(bars, xlabel, compared=True)
    rates = [(r, r.value) for r in res.rows if r.unit in ("tokens/s", "batches/s") and r.value]
    bars = [Bar(f"{r.metric} ({r.unit})", v, f"{fmt(v, r.unit)} {r.unit}") for r, v in rates]
    return BenchPlot(bars, "per second (log scale): right = faster", compared=False)


def plot_bench(res: BenchResult, path: Path) -> Path:
    """bench.png: `bench_plot`'s bars, horizontal, row names wrapped; compared bars grow from 1 (the peer)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plan = bench_plot(res)
    values = [b.value for b in plan.bars]
    labels = [textwrap.fill(b.label, 60) for b in plan.bars]
    height = 0.2 * sum(t.count("\n") + 1 for t in labels) + 0.2 * len(labels) + 1.2
    fig, ax = plt.subplots(figsize=(11, height))
    ys = list(range(len(plan.bars)))
    if plan.compared:
        colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
        ax.barh(ys, [v - 1 for v in values], left=1.0, color=colors, height=0.6)
        ax.axvline(1.0, color="gray", lw=0.8)
    else:
        floor = min(values, default=1.0) / 3  # a log axis has no 0 to grow from
        ax.barh(ys, [v - floor for v in values], left=floor, height=0.6)
    for y, b in zip(ys, plan.bars, strict=True):
        ax.text(b.value, y, f" {b.note}", va="center", fontsize=8, ha="left" if b.value >= 1 else "right")
    ax.set_xscale("log")
    if plan.compared:  # after the scale, which sets its own: 0.5x 1x 2x, not 10^0
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        # minor ticks: only 2x and 5x of each decade are named, so the names never run together
        some = FuncFormatter(lambda v, _: f"{v:g}x" if f"{v:.0e}"[0] in "25" else "")
        ax.xaxis.set_minor_formatter(some)
    ax.set_xlabel(plan.xlabel, fontsize=8)
    ax.set_yticks(ys, labels, fontsize=7)
    ax.invert_yaxis()
    ax.margins(x=0.3)  # room for the notes
    m, st = res.machine, res.settings
    ax.set_title(
        f"nanogpt bench: {st['backend']} {st['dtype']}, batch {st['batch']} x {st['seq']}, "
        f"{m.get('gpu') or m['cpu']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def make_out_dir(out: str | Path) -> Path:
    """The output folder, created now: a bench of minutes must not end on an --out it cannot write."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for bench.json, bench.md and bench.png")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"--out {out} cannot be created ({e.strerror}); pass a folder you can write"
        ) from None
    return out


def write_outputs(res: BenchResult, out: str | Path) -> Path:
    out = make_out_dir(out)
    (out / "bench.json").write_text(json.dumps(res.to_dict(), indent=2) + "\n")
    (out / "bench.md").write_text(markdown_table(res))
    plot_bench(res, out / "bench.png")
    return out
