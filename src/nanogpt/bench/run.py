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
    activation_estimate,
    check_rows,
    decode_bytes_per_token,
    forward_flops_per_token,
    load_warnings,
    machine_info,
    measure_roofline,
    rate_row,
    time_row,
    timed,
)
from nanogpt.bench.workloads import (
    Inputs,
    measure_activation_memory,
    mlx_fns,
    overlap_stride,
    peer_fns,
    peer_model,
    torch_fns,
)
from nanogpt.config import ModelConfig
from nanogpt.errors import UserError
from nanogpt.kernels.device import torch_dtype
from nanogpt.kernels.quant import quantize_int8

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
    model: torch.nn.Module,
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
    """Every row of the table for `model` (a torch NanoGPTLMHeadModel; backend="mlx" times its MLX twin)."""
    say = progress or (lambda _: None)
    t_start = time.perf_counter()
    cfg: ModelConfig = model.config
    check_settings(cfg, batch, seq, repeats, warmup, dtype, backend, compile)
    check_int8_peers(dtype, peers)
    device = next(model.parameters()).device
    load0 = list(os.getloadavg())
    if dtype == "int8":
        return int8_bench(model, batch, seq, repeats, warmup, device, say, load0, t_start)
    n_total, n_unique = model.num_params(unique=False), model.num_params(unique=True)
    inp = Inputs.make(cfg, batch, seq, eval_windows or batch)
    ours = mlx_fns(model, inp, dtype) if backend == "mlx" else torch_fns(model, inp, dtype, device, compile)
    peer = peer_model(cfg).to(device) if peers else None
    theirs = peer_fns(peer, inp, dtype, device, compile) if peer is not None else None

    say(f"roofline: {backend} matmul GFLOP/s at the model's shapes, copy bandwidth")
    roof = measure_roofline(cfg, batch, seq, dtype, device, repeats, backend)
    res = BenchResult(
        config=cfg.to_dict(),
        settings={
            "batch": batch,
            "seq": seq,
            "dtype": dtype,
            "repeats": repeats,
            "warmup": warmup,
            "backend": backend,
            "compile": compile,
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": inp.new_tokens,
            "ttft_prompt_tokens": seq,
            "eval_tokens": len(inp.eval_tokens) - 1,
            "inputs": "fixed random token ids",
            "peer": PEER_NAME if peer is not None else None,
            "peer_attn_implementation": getattr(peer.config, "_attn_implementation", None) if peer else None,
        },
        machine=machine_info(device),
        roofline=roof,
    )
    rows = res.rows

    def both(key: str) -> list[Stat]:
        return timed([ours[key]] + ([theirs[key]] if theirs else []), repeats, warmup, device)

    rows += size_rows(cfg, n_total, n_unique, peer.num_parameters() if peer is not None else None)
    say("training step (forward + backward + AdamW) and forward pass")
    rows += throughput_rows(both, batch, seq)
    say("decode (batch 1, KV cache, greedy) and time to first token")
    rows += decode_rows(both, seq, inp.new_tokens)
    say("perplexity evaluation")
    rows += eval_rows(both, batch, seq, len(inp.eval_tokens) - 1)
    if dtype != "fp32" and backend == "torch":
        say(f"accuracy: the eval NLL in {dtype} and in fp32")
        rows.append(accuracy_row(model, peer, ours, theirs, inp, dtype, device, seq))
    say("activation memory" + (" (fresh processes)" if device.type == "cpu" and backend == "torch" else ""))
    if backend == "mlx":
        act = ours["activation"]()
    else:
        act = measure_activation_memory(cfg, batch, seq, dtype, "ours", device)
    act_peer = measure_activation_memory(cfg, batch, seq, dtype, "peer", device) if peer is not None else None
    res.activation = {"ours": act, "peer": act_peer}
    rows += memory_rows(cfg, batch, seq, dtype, act, act_peer)
    rows += efficiency_rows(res, cfg, n_unique, seq, dtype, inp.new_tokens)
    return finish(res, load0, t_start)


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
    model: torch.nn.Module,
    batch: int,
    seq: int,
    repeats: int,
    warmup: int,
    device: torch.device,
    say: Callable[[str], None],
    load0: list[float],
    t_start: float,
) -> BenchResult:
    """`--dtype int8`: the inference rows of an int8-weight copy of `model`, beside its bf16 and fp32 decode.

    The three decodes alternate run by run (`timed`), so load hits them alike; no training, activation or
    MFU rows (int8 here is weights for inference only), and the accuracy row is against fp32.
    """
    cfg: ModelConfig = model.config
    inp = Inputs.make(cfg, batch, seq, batch)
    qmodel = quantize_int8(copy.deepcopy(model))
    int8 = torch_fns(qmodel, inp, "fp32", device)
    bf16, fp32 = torch_fns(model, inp, "bf16", device), torch_fns(model, inp, "fp32", device)
    say("roofline: matmul GFLOP/s at the model's shapes, copy bandwidth")
    roof = measure_roofline(cfg, batch, seq, "fp32", device, repeats, "torch")
    settings = {
        "batch": batch,
        "seq": seq,
        "dtype": "int8",
        "repeats": repeats,
        "warmup": warmup,
        "backend": "torch",
        "compile": False,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": inp.new_tokens,
        "eval_tokens": len(inp.eval_tokens) - 1,
        "inputs": "fixed random token ids",
        "peer": None,
    }
    res = BenchResult(cfg.to_dict(), settings, machine_info(device), roof)
    n_total, n_unique = model.num_params(unique=False), model.num_params(unique=True)
    res.rows += size_rows(cfg, n_total, n_unique, None)
    tensors = {id(t): t for t in [*qmodel.parameters(), *qmodel.buffers()]}.values()
    what = "Weight memory int8: the Linear layers and the tied head / token table int8 (+ a bf16 scale per row)"
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    res.rows.append(Row("weights_int8_mib", what, nbytes / MIB, "MiB", higher_is_better=False))
    say("decode (batch 1, KV cache, greedy): int8, bf16 and fp32 alternating")
    q, b, f = timed([int8["decode"], bf16["decode"], fp32["decode"]], repeats, warmup, device)
    what = f"Decode: batch 1, KV cache, greedy, {PROMPT_TOKENS}-token prompt, {inp.new_tokens} new tokens"
    new = inp.new_tokens
    res.rows += [
        rate_row("decode_tokens_per_s", f"{what}, int8 weights", new, "tokens/s", q),
        rate_row(
            "decode_bf16_tokens_per_s",
            f"{what}, bf16 (the same model, bf16 weight copies)",
            new,
            "tokens/s",
            b,
        ),
        rate_row("decode_fp32_tokens_per_s", f"{what}, fp32", new, "tokens/s", f),
        Row("decode_int8_over_bf16", "Decode speed of int8 over bf16 (medians)", b.median / q.median, "x"),
        time_row(
            "ttft_s",
            f"Time to first token, int8: {seq}-token prompt",
            *timed([int8["ttft"]], repeats, warmup, device),
        ),
    ]
    say("perplexity evaluation and accuracy (int8 against fp32)")
    res.rows += eval_rows(
        lambda key: timed([int8[key]], repeats, warmup, device), batch, seq, len(inp.eval_tokens) - 1
    )
    delta = abs(int8["eval"]().mean_nll - fp32["eval"]().mean_nll)
    what = "Accuracy cost of int8: absolute difference of the mean NLL with int8 weights and in fp32"
    res.rows.append(
        Row(
            "low_precision_nll_delta",
            f"{what}, eval tokens at stride {seq}",
            delta,
            "nats",
            higher_is_better=False,
        )
    )
    return finish(res, load0, t_start)


# --- the rows, section by section (run_bench times; these turn the timings into rows) --------------------


def size_rows(cfg: ModelConfig, n_total: int, n_unique: int, peer_unique: int | None) -> list[Row]:
    """Parameter counts (the card's tied-twice count and the unique one) and weight memory."""
    tied = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    rows = [
        Row(
            "params_total",
            "Model size: parameters, tied matrix counted twice (the card's count)",
            n_total,
            "params",
            peer=peer_unique + tied if peer_unique else None,
        ),
        Row("params_unique", "Model size: unique parameters", n_unique, "params", peer=peer_unique),
    ]
    for name, nb in (("fp32", 4), ("fp16", 2)):
        rows.append(
            Row(
                f"weights_{name}_mib",
                f"Weight memory {name}: unique tensors",
                n_unique * nb / MIB,
                "MiB",
                peer=peer_unique * nb / MIB if peer_unique else None,
                higher_is_better=False,
            )
        )
    return rows


def throughput_rows(both: Callable[[str], list[Stat]], batch: int, seq: int) -> list[Row]:
    """Training step and forward pass, in tokens/s and batches/s."""
    tok = batch * seq
    train, fwd = both("train"), both("forward")
    what = f"Training throughput: forward + backward + AdamW step, batch {batch} x {seq}"
    rows = [
        rate_row("train_tokens_per_s", what, tok, "tokens/s", *train),
        rate_row("train_batches_per_s", what, 1, "batches/s", *train),
    ]
    what = f"Forward-only throughput: logits at every position, no autograd, batch {batch} x {seq}"
    rows.append(rate_row("forward_tokens_per_s", what, tok, "tokens/s", *fwd))
    rows.append(rate_row("forward_batches_per_s", what, 1, "batches/s", *fwd))
    return rows


def decode_rows(both: Callable[[str], list[Stat]], seq: int, new: int) -> list[Row]:
    """Batch-1 decode speed, latency per 100 tokens, time to first token."""
    dec = both("decode")
    what = f"Decode: batch 1, KV cache, greedy, {PROMPT_TOKENS}-token prompt, {new} new tokens (prefill included)"
    rows = [rate_row("decode_tokens_per_s", what, new, "tokens/s", *dec)]
    dec = [d.scaled(NEW_TOKENS / new) for d in dec]
    rows.append(
        time_row("latency_per_100_tokens_s", f"Generation latency per {NEW_TOKENS} tokens (the decode runs)", *dec)
    )
    rows.append(
        time_row("ttft_s", f"Time to first token: {seq}-token prompt, prefill + one greedy pick", *both("ttft"))
    )
    return rows


def eval_rows(both: Callable[[str], list[Stat]], batch: int, seq: int, n_eval: int) -> list[Row]:
    """Sliding-window perplexity at stride = context and with overlapping windows."""
    what = f"Perplexity evaluation: sliding_window_nll, context = stride = {seq}, {n_eval} tokens, batch {batch}"
    rows = [rate_row("eval_tokens_per_s", what, n_eval, "tokens/s", *both("eval"))]
    stride = overlap_stride(seq)
    what = (
        f"Perplexity evaluation, overlapping windows: context {seq}, stride {stride} (each scored token "
        f"has >= {seq - stride} tokens of history), {n_eval} tokens, batch {batch}"
    )
    rows.append(rate_row("eval_overlap_tokens_per_s", what, n_eval, "tokens/s", *both("eval_overlap")))
    return rows


def accuracy_row(
    model: torch.nn.Module,
    peer: torch.nn.Module | None,
    ours: dict[str, Callable],
    theirs: dict[str, Callable] | None,
    inp: Inputs,
    dtype: str,
    device: torch.device,
    seq: int,
) -> Row:
    """What low precision costs: |mean NLL in `dtype` - mean NLL in fp32| on the eval tokens."""
    fp32_ours = torch_fns(model, inp, "fp32", device)["eval"]
    delta = abs(ours["eval"]().mean_nll - fp32_ours().mean_nll)
    peer_delta = None
    if theirs is not None and peer is not None:
        peer_delta = abs(theirs["eval"]() - peer_fns(peer, inp, "fp32", device)["eval"]())
    what = f"Accuracy cost of {dtype}: absolute difference of the mean NLL in {dtype} and in fp32"
    return Row(
        "low_precision_nll_delta",
        f"{what}, eval tokens at stride {seq}",
        delta,
        "nats",
        peer=peer_delta,
        higher_is_better=False,
    )


def memory_rows(
    cfg: ModelConfig, batch: int, seq: int, dtype: str, act: dict[str, Any], act_peer: dict[str, Any] | None
) -> list[Row]:
    """Activation memory: measured, and the analytic estimate beside it."""
    bpe = 4 if dtype == "fp32" else 2
    return [
        Row(
            "activation_mib",
            f"Activation memory, measured ({act['method']}), forward + backward, batch {batch} x {seq}",
            act["activation"] / MIB,
            "MiB",
            peer=act_peer["activation"] / MIB if act_peer else None,
            higher_is_better=False,
        ),
        Row(
            "activation_estimate_mib",
            "Activation memory, analytic estimate (`activation_estimate`; the peer's: a stock GPT-2)",
            activation_estimate(cfg, batch, seq, bpe) / MIB,
            "MiB",
            peer=activation_estimate(cfg, batch, seq, bpe, stock=True) / MIB if act_peer else None,
            higher_is_better=False,
        ),
    ]


def efficiency_rows(
    res: BenchResult, cfg: ModelConfig, n_unique: int, seq: int, dtype: str, new: int
) -> list[Row]:
    """MFU of training and forward, and decode bandwidth use, against the ceilings measured on this machine."""
    roof = res.roofline
    peak = roof["peak_gflops"] * 1e9
    fpt = forward_flops_per_token(cfg, n_unique, seq)
    rows = []
    for key, mult, label in (("train", 3.0, "training"), ("forward", 1.0, "forward")):
        r = res.row(f"{key}_tokens_per_s")
        rows.append(
            Row(
                f"mfu_{key}",
                f"MFU {label}: model FLOP/s over the measured matmul peak ({roof['peak_gflops']:.0f} GFLOP/s)",
                r.value * mult * fpt / peak,
                "fraction",
                peer=r.peer * mult * fpt / peak if r.peer else None,
            )
        )
    # our bf16 decode multiplies by bf16 copies of the weights; the peer's autocast reads fp32 and casts
    bpe = 4 if dtype == "fp32" else 2
    bpt = decode_bytes_per_token(n_unique, cfg, PROMPT_TOKENS + new // 2, bpe)
    r, bw = res.row("decode_tokens_per_s"), roof["copy_gb_s"] * 1e9
    rows.append(
        Row(
            "decode_bandwidth_fraction",
            f"Decode bandwidth use: {bpt / MIB:.0f} MiB read per token ({dtype} weights + KV, the least "
            f"either model reads) x tokens/s over the measured copy bandwidth ({roof['copy_gb_s']:.1f} GB/s)",
            r.value * bpt / bw,
            "fraction",
            peer=r.peer * bpt / bw if r.peer else None,
        )
    )
    return rows


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
    rates = [r for r in res.rows if r.unit in ("tokens/s", "batches/s") and r.value]
    bars = [Bar(f"{r.metric} ({r.unit})", r.value, f"{fmt(r.value, r.unit)} {r.unit}") for r in rates]
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
