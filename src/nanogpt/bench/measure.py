"""How `nanogpt bench` measures: timing statistics, the estimates, the machine's own roofline.

Pure math for the estimates (forward FLOPs, activation bytes, the bytes a decode step reads) sits beside the
timing helpers and the matmul/copy ceilings measured on the machine itself.

    stats = timed([fn], repeats=3, warmup=1, device=torch.device("cpu"))
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from nanogpt.config import ModelConfig
from nanogpt.kernels.decode import COPY_ROWS
from nanogpt.kernels.device import cpuinfo_field, torch_dtype

if TYPE_CHECKING:
    from nanogpt.model.gpt import NanoGPTLMHeadModel

MIB = 1024**2
PROMPT_TOKENS = 8  # the decode row's prompt
NEW_TOKENS = 100  # the decode row's new tokens (the card's "per 100 tokens")
PEER_NAME = "HF GPT2LMHeadModel"


# --- statistics and the pure math ---------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """Seconds per run over the timed repeats."""

    median: float
    min: float
    max: float
    samples: list[float]

    @classmethod
    def of(cls, samples: list[float]) -> Stat:
        return cls(statistics.median(samples), min(samples), max(samples), list(samples))

    def scaled(self, f: float) -> Stat:
        return Stat.of([t * f for t in self.samples])


@dataclass
class Row:
    """One line of the table. `value` is ours; `lo`/`hi` its spread (min..max of the repeats) if timed.

    A value `check_rows` found impossible is None (with its reason in the run's warnings), never a number.
    """

    key: str
    metric: str  # what exactly is timed or counted
    value: float | None
    unit: str
    lo: float | None = None
    hi: float | None = None
    peer: float | None = None
    peer_lo: float | None = None
    peer_hi: float | None = None
    higher_is_better: bool = True
    invalid: list[str] = field(default_factory=list)  # "ours" and/or "peer": values check_rows removed

    @property
    def ratio(self) -> float | None:
        """ours / peer (> 1 means ours is larger: faster for rates, slower for latencies)."""
        return self.value / self.peer if self.peer and self.value is not None else None


def _per(work: float, seconds: float) -> float:
    return work / seconds if seconds else math.inf  # a zero time: check_rows leaves it out


def rate_row(key: str, metric: str, work: float, unit: str, ours: Stat, peer: Stat | None = None) -> Row:
    """A throughput row: `work` units per run, from seconds per run (median; spread from max/min time)."""
    row = Row(key, metric, _per(work, ours.median), unit, _per(work, ours.max), _per(work, ours.min))
    if peer is not None:
        row.peer, row.peer_lo, row.peer_hi = (
            _per(work, peer.median),
            _per(work, peer.max),
            _per(work, peer.min),
        )
    return row


def time_row(key: str, metric: str, ours: Stat, peer: Stat | None = None) -> Row:
    """A latency row in seconds (lower is better)."""
    row = Row(key, metric, ours.median, "s", ours.min, ours.max, higher_is_better=False)
    if peer is not None:
        row.peer, row.peer_lo, row.peer_hi = peer.median, peer.min, peer.max
    return row


# --- a timed workload and the rows it fills ------------------------------------------------------------


Work = Callable[[], object]  # one run of a workload; the timer ignores what it returns


@dataclass(frozen=True)
class RowSpec:
    """A row a timed workload fills from its seconds per run.

    A rate (tokens/s, batches/s) is `per_run` units of work over the seconds; a time (unit "s") is the
    seconds scaled by `per_run` (1: the run's own time; 100 / n: per 100 tokens of a run making n).
    """

    key: str
    metric: str
    unit: str
    per_run: float = 1.0

    def fill(self, ours: Stat, peer: Stat | None) -> Row:
        if self.unit == "s":
            scaled = peer.scaled(self.per_run) if peer is not None else None
            return time_row(self.key, self.metric, ours.scaled(self.per_run), scaled)
        return rate_row(self.key, self.metric, self.per_run, self.unit, ours, peer)


@dataclass(frozen=True)
class Workload:
    """One timed measurement of the table: what it runs for ours and for the peer (the very same work),
    and the rows its seconds per run fill. A list of them is the table's timed part (`bench.table`)."""

    label: str  # what the progress line says while it runs
    ours: Work
    peer: Work | None
    rows: tuple[RowSpec, ...]


@dataclass(frozen=True)
class Timing:
    """How every workload is timed: `warmup` untimed runs, then `repeats` timed ones, on `device`."""

    repeats: int
    warmup: int
    device: torch.device


def run_workloads(group: Sequence[Workload], timing: Timing) -> list[Row]:
    """Time a group of workloads, all their runs alternating (`timed`: machine load hits each alike), and
    fill their rows in order. One workload (ours beside the peer) is a group of one."""
    fns = [fn for w in group for fn in (w.ours, w.peer) if fn is not None]
    stats = iter(timed(fns, timing.repeats, timing.warmup, timing.device))
    rows = []
    for w in group:
        ours = next(stats)
        peer = next(stats) if w.peer is not None else None
        rows += [spec.fill(ours, peer) for spec in w.rows]
    return rows


RATE_UNITS = ("tokens/s", "batches/s")
BUSY_FRACTION = 0.5  # other work worth half the cores (1-minute load average) disturbs a measurement


def impossible(value: float, unit: str) -> str | None:
    """Why a measured value cannot be true, or None: a zero or negative time (an infinite or negative
    rate), not finite, negative, or a fraction of a measured ceiling above 100% (the ceiling or the run
    was disturbed, e.g. by other load)."""
    zero_time = value == 0 and unit in (*RATE_UNITS, "s")
    if (math.isinf(value) and unit in RATE_UNITS) or value < 0 or zero_time:
        return f"{value} comes from a zero or negative time"
    if not math.isfinite(value):
        return f"{value} is not a finite number"
    if unit == "fraction" and value > 1:
        return f"{value * 100:.1f}% is above 100% of the ceiling measured on this machine"
    return None


def check_rows(rows: list[Row]) -> list[str]:
    """Replace every impossible value (ours or the peer's, with its spread) by None; one warning each."""
    warnings = []
    for r in rows:
        for who, attrs in (("ours", ("value", "lo", "hi")), ("peer", ("peer", "peer_lo", "peer_hi"))):
            v = getattr(r, attrs[0])
            why = impossible(v, r.unit) if v is not None else None
            if why is not None:
                warnings.append(f"{r.key} ({who}) is invalid and not reported: {why}")
                r.invalid.append(who)
                for a in attrs:
                    setattr(r, a, None)
    return warnings


def load_warnings(start: list[float], end: list[float], cores: int, own_threads: int) -> list[str]:
    """Warnings when the 1-minute load average says other work ran before or during the measurement.

    At the end the bench's own threads are part of the load, so they are subtracted: when the bench ran
    under a minute that underestimates the others, so this can miss load but never invents it.
    """
    limit = BUSY_FRACTION * cores
    out = []
    if start[0] > limit:
        out.append(
            f"the machine was busy before the bench (load average {start[0]:.2f} on {cores} cores): "
            "other work competes with the measurement; rerun on an idle machine"
        )
    others = end[0] - min(own_threads, cores)
    if others > limit:
        out.append(
            f"the machine was busy during the bench (load average {end[0]:.2f} on {cores} cores, "
            f"{own_threads} of it the bench's threads): rerun on an idle machine"
        )
    return out


def forward_flops_per_token(cfg: ModelConfig, n_unique: int, seq: int) -> float:
    """Forward FLOPs per token at sequence length `seq`: 2N for the weights + 4·L·seq·d for attention.

    N is the unique parameter count less the position table (a lookup, no matmul); the tied token table
    is counted once, as the lm_head matmul. A third of `train.optim.flops_per_token` (the PaLM estimate) at
    seq = context_length; training is 3x this (backward = 2x forward).
    """
    n = n_unique - cfg.context_length * cfg.d_model
    return 2.0 * n + 4.0 * cfg.n_layers * seq * cfg.d_model


def activation_estimate(
    cfg: ModelConfig, batch: int, seq: int, bytes_per_el: int = 4, stock: bool = False
) -> int:
    """Analytic bytes saved for backward by one training forward at (batch, seq), plus the head's buffers.

    Per layer and token: ln1 in/out (2d), q/k/v (3d), attention output and its contiguous copy (2d),
    ln2 in/out (2d), fc1 output and GELU output (2·d_ff). With dropout > 0: a 1-byte mask for each of the
    3 dropouts per layer, and attention leaves the fused kernel (PyTorch's CPU flash kernel has no
    dropout): the math path keeps each layer's softmax, its dropped copy and the mask (4 + 4 + 1 bytes per
    score), (B, nh, T, T) for a stock model, the (n + 1) / 2n of it under the diagonal for our n query
    blocks (`kernels.ops.causal_attention`). Head, both kinds: ln_f in/out (2d per token). A stock head (HF's,
    `stock=True`) adds the logits, their fp32 log-softmax and the logits' gradient (3·V fp32 per token);
    ours (`kernels.ops.linear_cross_entropy`) adds the gradient of h (d per token), one fp32 (V, chunk)
    buffer and the fp32 gradient of the head weight, which it computes in the forward pass.
    """
    from nanogpt.kernels.ops import ATTENTION_BLOCKS, chunk_size

    tokens = batch * seq
    per_layer = (9 * cfg.d_model + 2 * cfg.d_ff) * bytes_per_el
    attention = 0
    if cfg.dropout > 0:
        per_layer += 3 * cfg.d_model
        scores = cfg.n_layers * batch * cfg.n_heads * seq * seq
        if not stock:
            n = min(ATTENTION_BLOCKS, seq)
            scores = scores * (n + 1) // (2 * n)
        attention = scores * (2 * bytes_per_el + 1)
    if stock:
        head, fixed = 2 * cfg.d_model * bytes_per_el + 3 * cfg.vocab_size * 4, 0
    else:
        head = 3 * cfg.d_model * bytes_per_el
        fixed = (chunk_size(tokens, cfg.vocab_size) + cfg.d_model) * cfg.vocab_size * 4
    return tokens * (cfg.n_layers * per_layer + head) + attention + fixed


def decode_step_bytes(
    cfg: ModelConfig, dtype: str, positions: Sequence[int], copy_rows: int = COPY_ROWS
) -> int:
    """Bytes one decode step must read, exactly: every weight once, in the dtype the decode path reads it
    in, plus each row's KV cache. `positions[b]` is how many keys row b's attention reads (the positions
    cached before the step and its new token's); len(positions) is the step's rows.

    fp32 and bf16/fp16 multiply by `kernels.decode.Decoder`'s weight copies in their own dtype (biases too),
    up to `copy_rows` rows; above, by the stock fp32 weights (autocast reads them to cast them). int8
    (`kernels.quant`): int8 weights, a bf16 scale per output row, fp32 biases; the tied token table is the
    head's int8 rows. Everywhere: fp32 LayerNorms, one fp32 position row and one token row per row, the
    lm_head read once (a tied table is not read twice). The KV cache is fp32, bf16 or fp16 as the decode
    path keeps it (int8's is fp32). Padding that a layout adds (fp32 copies cut into column blocks) is not
    something a step must read, so it is not counted.
    """
    if dtype not in ("fp32", "bf16", "fp16", "int8"):
        raise ValueError(f"unknown decode dtype {dtype!r}; use fp32, bf16, fp16 or int8")
    rows, d, V, bias = len(positions), cfg.d_model, cfg.vocab_size, cfg.bias
    # (in, out) of every Linear of the blocks: per block qkv, out_proj, fc1, fc2; the head is (d, V), no bias
    blocks = [(d, 3 * d), (d, d), (d, cfg.d_ff), (cfg.d_ff, d)] * cfg.n_layers
    if dtype == "int8":  # an int8 byte per weight, a bf16 scale per output row, an fp32 bias
        weights = sum(i * o + 2 * o + (4 * o if bias else 0) for i, o in blocks) + d * V + 2 * V
        token_row = d + 2 if cfg.tie_embeddings else 4 * d  # the head's int8 row and its scale
    else:
        el = 2 if dtype != "fp32" and rows <= copy_rows else 4
        weights = el * (sum(i * o + (o if bias else 0) for i, o in blocks) + d * V)
        token_row = 4 * d
    norms = 4 * (2 * cfg.n_layers + 1) * d * (2 if bias else 1)  # two per block and ln_f: weight (+ bias)
    lookups = rows * (token_row + 4 * d)  # each row's token and position rows
    kv_el = 2 if dtype in ("bf16", "fp16") else 4
    kv = 2 * cfg.n_layers * d * kv_el * sum(positions)  # keys and values of every layer
    return weights + norms + lookups + kv


def memory_bound_tokens_per_s(rows: int, step_bytes: float, copy_gb_s: float) -> float:
    """The tokens/s a decode step of `rows` rows could make at most, if reading its `step_bytes` (one pass
    over memory) went at the measured copy bandwidth and nothing else took time."""
    return rows * copy_gb_s * 1e9 / step_bytes


# --- the machine and its own roofline -----------------------------------------------------------------


def batched_step_seconds(
    model: NanoGPTLMHeadModel, dtype: str, rows: int, positions: int, repeats: int
) -> Stat:
    """Seconds of the server's decode step alone: `rows` streams, each with `positions` tokens in its slot.

    The step `serve` runs at that load (a `Decoder` over a `SlotKVCache`, the view built each step), timed
    outside any server, so that its tokens/s (rows / seconds) can be set against the step's own memory bound.
    The cache holds zeros: a step's time depends on the shapes it reads, not on the values.
    """
    from nanogpt.kernels.decode import Decoder
    from nanogpt.model.kv_cache import SlotKVCache

    decoder = Decoder(model, dtype)
    cache = SlotKVCache.for_model(model.config, rows, decoder.device, decoder.cache_dtype)
    idx = torch.zeros(rows, 1, dtype=torch.long, device=decoder.device)

    def step() -> None:
        cache.lengths[:] = [positions] * rows  # every timed step at the same positions
        decoder.step(idx, cache.rows(0, [1] * rows))

    (stat,) = timed([step], repeats, 2, decoder.device)
    return stat


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = cpuinfo_field("model name") or platform.processor() or platform.machine()
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("numpy", "transformers", "mlx"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed is fine
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "platform": platform.platform(),
        "versions": versions,
    }


def sync(device: torch.device) -> None:
    """Wait for the device's queued work before a clock is read (CUDA and MPS run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fns: list[Callable[[], Any]], repeats: int, warmup: int, device: torch.device) -> list[Stat]:
    """Time each fn: `warmup` untimed runs, then `repeats` runs, the fns alternating run by run."""
    for _ in range(warmup):
        for fn in fns:
            fn()
            sync(device)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, s in zip(fns, samples, strict=True):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            s.append(time.perf_counter() - t0)
    return [Stat.of(s) for s in samples]


def _matmul(
    a: torch.Tensor, b: torch.Tensor, backend: str, dtype: str, device: torch.device
) -> Callable[[], object]:
    """One roofline matmul `a @ b` in `backend` (MLX is lazy: `mx.eval` makes it run), inputs made now."""
    if backend == "mlx":
        import mlx.core as mx

        ma, mb = mx.array(a.numpy()), mx.array(b.numpy())
        return lambda: mx.eval(ma @ mb)
    ta, tb = a.to(device, torch_dtype(dtype)), b.to(device, torch_dtype(dtype))
    return lambda: ta @ tb


def measure_roofline(
    cfg: ModelConfig,
    batch: int,
    seq: int,
    dtype: str,
    device: torch.device,
    repeats: int,
    backend: str = "torch",
) -> dict[str, Any]:
    """This machine's own ceilings: matmul GFLOP/s at the model's shapes (in `backend`) and copy GB/s.

    Each is the fastest of the repeats (a ceiling, so the least disturbed run), not the median.
    """
    m, d = batch * seq, cfg.d_model
    shapes = {  # name -> (M, K, N): (M, K) x (K, N)
        "qkv (BT,d)x(d,3d)": (m, d, 3 * d),
        "fc1 (BT,d)x(d,d_ff)": (m, d, cfg.d_ff),
        "fc2 (BT,d_ff)x(d_ff,d)": (m, cfg.d_ff, d),
        "lm_head (BT,d)x(d,V)": (m, d, cfg.vocab_size),
    }
    g = torch.Generator().manual_seed(0)
    gflops = {}
    for name, (mm, k, n) in shapes.items():
        a, b = torch.randn(mm, k, generator=g), torch.randn(k, n, generator=g)
        (stat,) = timed([_matmul(a, b, backend, dtype, device)], repeats, 1, device)
        gflops[name] = 2.0 * mm * k * n / stat.min / 1e9  # a ceiling: the fastest run
    return {
        "backend": backend,
        "dtype": dtype,
        "matmul_gflops": gflops,
        "peak_gflops": max(gflops.values()),
        "copy_gb_s": copy_bandwidth(device, repeats),
        "copy_bytes": COPY_BYTES,
    }


COPY_BYTES = 256 * MIB  # far above any cache: the copy streams from memory


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """GB/s of a `COPY_BYTES` torch `copy_` (read + write), the fastest of the repeats: the machine's own
    memory ceiling, against which decode's bound is stated (`memory_bound_tokens_per_s`)."""
    src = torch.ones(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    (copy,) = timed([lambda: dst.copy_(src)], repeats, 1, device)
    return 2 * COPY_BYTES / copy.min / 1e9
