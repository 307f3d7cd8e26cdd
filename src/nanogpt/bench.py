"""The model card's benchmark table, with each row measuring exactly what its name says.

The card's table mixes measurements: its "training throughput" was a forward pass only and its
"activation memory" an estimate. Here training throughput is forward + backward + AdamW step (the real
`train.py` step: fp32 cross-entropy, gradient clipping), forward-only throughput is its own row, decode is
batch 1 with the KV cache (`generate.decode_steps`, greedy), and activation memory is measured: on CUDA
`torch.cuda.max_memory_allocated`; on CPU the peak RSS (VmHWM, reset) of a fresh subprocess during one
forward + backward minus its RSS once weights, gradients and AdamW moments are allocated (glibc's mmap
threshold is pinned so freed tensors leave the RSS). MFU is measured against this machine's own matmul
speed at the model's shapes, and decode against its own copy bandwidth, not a spec-sheet peak.
Every timed row has a warm-up, then `repeats` runs; the value is the median, the spread min..max.
With `--peers` a Hugging Face `GPT2LMHeadModel` of the same shapes (random init, no download) runs the
same rows in the same process, alternating with ours run by run so that machine load hits both alike.

    nanogpt bench --preset card --peers --out bench/
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nanogpt.config import PRESETS, ModelConfig, TrainConfig, preset
from nanogpt.device import autocast, resolve_device, torch_dtype
from nanogpt.errors import UserError

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
    """One line of the table. `value` is ours; `lo`/`hi` its spread (min..max of the repeats) if timed."""

    key: str
    metric: str  # what exactly is timed or counted
    value: float
    unit: str
    lo: float | None = None
    hi: float | None = None
    peer: float | None = None
    peer_lo: float | None = None
    peer_hi: float | None = None
    higher_is_better: bool = True

    @property
    def ratio(self) -> float | None:
        """ours / peer (> 1 means ours is larger: faster for rates, slower for latencies)."""
        return self.value / self.peer if self.peer else None


def rate_row(key: str, metric: str, work: float, unit: str, ours: Stat, peer: Stat | None = None) -> Row:
    """A throughput row: `work` units per run, from seconds per run (median; spread from max/min time)."""
    row = Row(key, metric, work / ours.median, unit, work / ours.max, work / ours.min)
    if peer is not None:
        row.peer, row.peer_lo, row.peer_hi = work / peer.median, work / peer.max, work / peer.min
    return row


def time_row(key: str, metric: str, ours: Stat, peer: Stat | None = None) -> Row:
    """A latency row in seconds (lower is better)."""
    row = Row(key, metric, ours.median, "s", ours.min, ours.max, higher_is_better=False)
    if peer is not None:
        row.peer, row.peer_lo, row.peer_hi = peer.median, peer.min, peer.max
    return row


def forward_flops_per_token(cfg: ModelConfig, n_unique: int, seq: int) -> float:
    """Forward FLOPs per token at sequence length `seq`: 2N for the weights + 4·L·seq·d for attention.

    N is the unique parameter count less the position table (a lookup, no matmul); the tied token table
    is counted once, as the lm_head matmul. A third of `train.flops_per_token` (the PaLM estimate) at
    seq = context_length; training is 3x this (backward = 2x forward).
    """
    n = n_unique - cfg.context_length * cfg.d_model
    return 2.0 * n + 4.0 * cfg.n_layers * seq * cfg.d_model


def activation_estimate(cfg: ModelConfig, batch: int, seq: int, bytes_per_el: int = 4) -> int:
    """Analytic bytes saved for backward by one training forward at (batch, seq), plus the logits' gradient.

    Per layer and token: ln1 in/out (2d), q/k/v (3d), attention output and its contiguous copy (2d),
    ln2 in/out (2d), fc1 output and GELU output (2·d_ff). Head: ln_f in/out (2d), the logits, their fp32
    log-softmax and the logits' gradient (3·V fp32). With dropout > 0: a 1-byte mask for each of the 3
    dropouts per layer, and attention leaves the fused kernel (PyTorch's CPU flash kernel has no dropout):
    the math path keeps each layer's (B, nh, T, T) softmax, its dropped copy and the mask (4 + 4 + 1 bytes).
    """
    tokens = batch * seq
    per_layer = (9 * cfg.d_model + 2 * cfg.d_ff) * bytes_per_el
    attention = 0
    if cfg.dropout > 0:
        per_layer += 3 * cfg.d_model
        attention = cfg.n_layers * batch * cfg.n_heads * seq * seq * (2 * bytes_per_el + 1)
    head = 2 * cfg.d_model * bytes_per_el + 3 * cfg.vocab_size * 4
    return tokens * (cfg.n_layers * per_layer + head) + attention


def decode_bytes_per_token(n_unique: int, cfg: ModelConfig, context: int, bytes_per_el: int = 4) -> float:
    """Bytes one decode step must read: every weight once (the tied table as the lm_head) + the KV cache.

    `context` is the mean number of cached positions; the position table is read one row at a time.
    """
    weights = (n_unique - cfg.context_length * cfg.d_model) * bytes_per_el
    kv = 2 * cfg.n_layers * context * cfg.d_model * bytes_per_el
    return float(weights + kv)


# --- the machine and its own roofline -----------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: list[Callable[[], Any]], repeats: int, warmup: int, device: torch.device) -> list[Stat]:
    """Time each fn: `warmup` untimed runs, then `repeats` runs, the fns alternating run by run."""
    for _ in range(warmup):
        for fn in fns:
            fn()
            _sync(device)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, s in zip(fns, samples, strict=True):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            s.append(time.perf_counter() - t0)
    return [Stat.of(s) for s in samples]


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
        if backend == "mlx":
            import mlx.core as mx

            a, b = mx.array(a.numpy()), mx.array(b.numpy())
            fn: Callable[[], Any] = lambda a=a, b=b: mx.eval(a @ b)  # noqa: E731
        else:
            a, b = a.to(device, torch_dtype(dtype)), b.to(device, torch_dtype(dtype))
            fn = lambda a=a, b=b: a @ b  # noqa: E731
        (stat,) = timed([fn], repeats, 1, device)
        gflops[name] = 2.0 * mm * k * n / stat.min / 1e9  # a ceiling: the fastest run
    n_bytes = 256 * MIB
    src = torch.ones(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    (copy,) = timed([lambda: dst.copy_(src)], repeats, 1, device)
    return {
        "backend": backend,
        "dtype": dtype,
        "matmul_gflops": gflops,
        "peak_gflops": max(gflops.values()),
        "copy_gb_s": 2 * n_bytes / copy.min / 1e9,  # read + write, torch copy_
        "copy_bytes": n_bytes,
    }


# --- what is timed: ours (torch or MLX) and the peer --------------------------------------------------


@dataclass
class Inputs:
    """Fixed random token ids (speed does not depend on their values): a batch, a prompt, eval tokens."""

    x: torch.Tensor  # (B, T)
    y: torch.Tensor  # (B, T)
    prompt: list[int]  # seq tokens: the time-to-first-token prompt
    decode_prompt: list[int]  # PROMPT_TOKENS tokens
    new_tokens: int  # NEW_TOKENS, or fewer where the context is too short for prompt + 100
    eval_tokens: torch.Tensor  # (n_windows * seq + 1,)

    @classmethod
    def make(cls, cfg: ModelConfig, batch: int, seq: int, eval_windows: int) -> Inputs:
        g = torch.Generator().manual_seed(1)
        x, y = (torch.randint(0, cfg.vocab_size, (batch, seq), generator=g) for _ in range(2))
        prompt = torch.randint(0, cfg.vocab_size, (seq,), generator=g).tolist()
        evals = torch.randint(0, cfg.vocab_size, (eval_windows * seq + 1,), generator=g)
        new = max(1, min(NEW_TOKENS, cfg.context_length - PROMPT_TOKENS))
        return cls(x, y, prompt, prompt[:PROMPT_TOKENS], new, evals)


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits  # ours: a tensor; HF: an output object


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`train.cross_entropy_loss` for either model: fp32 cross-entropy of (B, T, V) logits."""
    logits = _logits(model, x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


def _train_forward(
    model: torch.nn.Module, inp: Inputs, dtype: str, device: torch.device
) -> dict[str, Callable]:
    """A training step (as `train.py`: fp32 loss, clip at 1.0, AdamW) and an inference forward."""
    from nanogpt.train import make_optimizer, optimizer_step

    tcfg = TrainConfig()
    x, y = inp.x.to(device), inp.y.to(device)
    opt = make_optimizer(model, tcfg, device)

    def train() -> None:  # dropout on, as in training
        model.train()
        with autocast(device, dtype):
            loss = _loss(model, x, y)
        loss.backward()
        optimizer_step(model, opt, tcfg.learning_rate, tcfg.grad_clip)

    def forward() -> None:  # logits at every position, eval mode, no autograd
        model.eval()
        with torch.inference_mode(), autocast(device, dtype):
            _logits(model, x)

    return {"train": train, "forward": forward}


def torch_fns(model: torch.nn.Module, inp: Inputs, dtype: str, device: torch.device) -> dict[str, Callable]:
    from nanogpt.evaluate import sliding_window_nll
    from nanogpt.generate import decode_steps

    seq, batch = inp.x.shape[1], inp.x.shape[0]

    def decode(prompt: list[int], new: int) -> Callable[[], int]:
        return lambda: sum(1 for _ in decode_steps(model, prompt, new, temperature=0, dtype=dtype))

    return {
        **_train_forward(model, inp, dtype, device),
        "decode": decode(inp.decode_prompt, inp.new_tokens),
        "ttft": decode(inp.prompt, 1),
        "eval": lambda: sliding_window_nll(
            model, inp.eval_tokens, context=seq, stride=seq, batch_size=batch, dtype=dtype
        ),
    }


def peer_model(cfg: ModelConfig) -> torch.nn.Module:
    """HF GPT2LMHeadModel with our shapes: random init, no download, tied head, the same dropout."""
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise UserError("--peers needs transformers; install it with pip install 'nanogpt[hf]'") from None
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.context_length,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_ff,
            activation_function={"gelu": "gelu", "gelu_tanh": "gelu_new"}[cfg.activation],
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            layer_norm_epsilon=cfg.ln_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=50256,
            eos_token_id=50256,
            pad_token_id=50256,
        )
    )


def peer_fns(peer: torch.nn.Module, inp: Inputs, dtype: str, device: torch.device) -> dict[str, Callable]:
    """The same work through HF: its training step, `generate` with its KV cache, forward and eval."""
    seq, batch = inp.x.shape[1], inp.x.shape[0]

    def decode(prompt: list[int], new: int) -> Callable[[], int]:
        ids = torch.tensor([prompt], device=device)

        def run() -> int:
            peer.eval()
            with torch.inference_mode(), autocast(device, dtype):
                out = peer.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                )
            return out.size(1) - ids.size(1)

        return run

    n = len(inp.eval_tokens) - 1
    ex, ey = inp.eval_tokens[:n].view(-1, seq).to(device), inp.eval_tokens[1:].view(-1, seq).to(device)

    def evaluate() -> float:  # the same windows as sliding_window_nll at stride = context: total NLL, fp32
        peer.eval()
        total = 0.0
        with torch.inference_mode(), autocast(device, dtype):
            for b in range(0, len(ex), batch):
                logits = peer(ex[b : b + batch]).logits.float()
                total += F.cross_entropy(
                    logits.flatten(0, 1), ey[b : b + batch].flatten(), reduction="sum"
                ).item()
        return total

    return {
        **_train_forward(peer, inp, dtype, device),
        "decode": decode(inp.decode_prompt, inp.new_tokens),
        "ttft": decode(inp.prompt, 1),
        "eval": evaluate,
    }


def mlx_fns(model: torch.nn.Module, inp: Inputs, dtype: str) -> dict[str, Callable]:
    """The MLX twin of `model` (same weights) and its rows: compiled train step, forward, decode, eval."""
    if dtype != "fp32":
        raise UserError(f"--backend mlx measures fp32 only; drop --dtype {dtype}")
    try:
        import nanogpt.mlx  # noqa: F401 - raises a one-line UserError when MLX is not importable
    except ModuleNotFoundError:
        raise UserError("--backend mlx needs the nanogpt.mlx package, which this install lacks") from None
    import mlx.core as mx

    from nanogpt.checkpoint import model_state
    from nanogpt.mlx.checkpoint import load_mlx_state_into
    from nanogpt.mlx.generate import decode_steps
    from nanogpt.mlx.model import NanoGPTLMHeadModel as MLXModel
    from nanogpt.mlx.train import make_optimizer, make_train_step, token_nll

    cfg, tcfg = model.config, TrainConfig()
    m = MLXModel(cfg)
    load_mlx_state_into(
        m, {k: mx.array(v.cpu().float().numpy()) for k, v in model_state(model).items()}, "model"
    )
    opt = make_optimizer(m, tcfg)
    opt.learning_rate = tcfg.learning_rate
    step = make_train_step(m, opt, tcfg)
    x, y = mx.array(inp.x.numpy().astype("int32")), mx.array(inp.y.numpy().astype("int32"))
    seq, batch = inp.x.shape[1], inp.x.shape[0]
    n = len(inp.eval_tokens) - 1
    ev = inp.eval_tokens.numpy().astype("int32")
    ex, ey = mx.array(ev[:n].reshape(-1, seq)), mx.array(ev[1:].reshape(-1, seq))

    def train() -> None:
        m.train()
        loss, norm = step(x[None], y[None])
        mx.eval(loss, norm, m.parameters(), opt.state)

    def forward() -> None:
        m.eval()
        mx.eval(m(x))

    def decode(prompt: list[int], new: int) -> Callable[[], int]:
        return lambda: sum(1 for _ in decode_steps(m, prompt, new, temperature=0))

    def evaluate() -> float:
        m.eval()
        return sum(
            token_nll(m, ex[b : b + batch], ey[b : b + batch]).sum().item() for b in range(0, len(ex), batch)
        )

    def activation() -> dict[str, Any]:  # MLX's allocator counters, in process
        m.train()
        mx.eval(m.parameters(), opt.state)
        gc.collect()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        loss_and_grad = nn_value_and_grad(m)
        mx.eval(loss_and_grad(m, x, y))
        peak = mx.get_peak_memory()
        return {
            "method": "MLX get_peak_memory minus active memory before the step",
            "base": base,
            "peak": peak,
            "activation": peak - base,
        }

    return {
        "train": train,
        "forward": forward,
        "decode": decode(inp.decode_prompt, inp.new_tokens),
        "ttft": decode(inp.prompt, 1),
        "eval": evaluate,
        "activation": activation,
    }


def nn_value_and_grad(m: Any) -> Callable:
    import mlx.nn as nn

    from nanogpt.mlx.train import cross_entropy_loss

    return nn.value_and_grad(m, cross_entropy_loss)


# --- activation memory --------------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    """A `kB` line of /proc/self/status (VmRSS: resident now; VmHWM: peak resident) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). ru_maxrss cannot be reset: it survives exec."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def activation_probe(
    cfg: ModelConfig, batch: int, seq: int, dtype: str, which: str, device: torch.device
) -> dict:
    """Bytes one forward + backward needs beyond the persistent state, measured.

    The persistent state is what lives between training steps: weights, gradients (kept allocated, as
    with zero_grad(set_to_none=False)) and AdamW's two moments, all allocated before the step. On CUDA:
    peak allocated minus allocated before. On CPU, call it in a fresh process (`measure_activation_memory`):
    peak RSS (VmHWM, reset just before the step) minus RSS before.
    """
    from nanogpt.model import NanoGPTLMHeadModel

    torch.manual_seed(0)
    model = (NanoGPTLMHeadModel(cfg) if which == "ours" else peer_model(cfg)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # lr 0: creates exp_avg / exp_avg_sq without moving the weights
    inp = Inputs.make(cfg, batch, seq, 0)
    x, y = inp.x.to(device), inp.y.to(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        if not _reset_peak_rss():
            raise UserError("activation memory on CPU needs Linux /proc/self/clear_refs; use a CUDA device")
        base = _status_bytes("VmRSS")
    with autocast(device, dtype):
        loss = _loss(model, x, y)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak, method = torch.cuda.max_memory_allocated(device), "CUDA max_memory_allocated"
    else:
        peak, method = _status_bytes("VmHWM"), "peak RSS (VmHWM) of a fresh process"
    return {
        "method": f"{method} minus the same before the step",
        "base": base,
        "peak": peak,
        "activation": peak - base,
    }


def measure_activation_memory(
    cfg: ModelConfig, batch: int, seq: int, dtype: str, which: str, device: torch.device
) -> dict:
    """`activation_probe` in this process on CUDA; on CPU in a fresh one (RSS is per process)."""
    if device.type != "cpu":
        return activation_probe(cfg, batch, seq, dtype, which, device)
    code = "import sys; from nanogpt.bench import probe_main; sys.exit(probe_main(sys.argv[1:]))"
    arg = {"cfg": cfg.to_dict(), "batch": batch, "seq": seq, "dtype": dtype, "which": which}
    arg = json.dumps({**arg, "threads": torch.get_num_threads()})
    # a fixed mmap threshold: every large tensor is its own mapping, so freeing one lowers the RSS
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"activation-memory subprocess failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def probe_main(argv: list[str]) -> int:
    """Entry point of the activation-memory subprocess: one JSON argument in, one JSON line out."""
    a = json.loads(argv[0])
    cfg = ModelConfig.from_dict(a["cfg"])
    torch.set_num_threads(a["threads"])
    print(
        json.dumps(activation_probe(cfg, a["batch"], a["seq"], a["dtype"], a["which"], torch.device("cpu")))
    )
    return 0


# --- the run ------------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    config: dict[str, Any]
    settings: dict[str, Any]
    machine: dict[str, Any]
    roofline: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    activation: dict[str, Any] = field(default_factory=dict)
    load_average: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for r, row in zip(d["rows"], self.rows, strict=True):
            r["ratio"] = row.ratio
        return d


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
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Every row of the table for `model` (a torch NanoGPTLMHeadModel; backend="mlx" times its MLX twin)."""
    say = progress or (lambda _: None)
    t_start = time.perf_counter()
    cfg: ModelConfig = model.config
    if not 1 <= seq <= cfg.context_length:
        raise UserError(f"--seq {seq} is outside 1..{cfg.context_length} (the context); pass a smaller --seq")
    if batch < 1 or repeats < 1 or warmup < 0:
        raise UserError("--batch and --repeats must be at least 1")
    torch_dtype(dtype)
    if backend not in ("torch", "mlx"):
        raise UserError(f"--backend {backend!r} is unknown; use torch or mlx")
    device = next(model.parameters()).device
    load0 = list(os.getloadavg())
    n_total, n_unique = model.num_params(unique=False), model.num_params(unique=True)
    inp = Inputs.make(cfg, batch, seq, eval_windows or batch)
    ours = mlx_fns(model, inp, dtype) if backend == "mlx" else torch_fns(model, inp, dtype, device)
    peer = peer_model(cfg).to(device) if peers else None
    theirs = peer_fns(peer, inp, dtype, device) if peer is not None else None

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

    peer_unique = peer.num_parameters() if peer is not None else None
    tied = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    rows.append(
        Row(
            "params_total",
            "Model size: parameters, tied matrix counted twice (the card's count)",
            n_total,
            "params",
            peer=peer_unique + tied if peer_unique else None,
        )
    )
    rows.append(Row("params_unique", "Model size: unique parameters", n_unique, "params", peer=peer_unique))
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

    say("training step (forward + backward + AdamW) and forward pass")
    tok = batch * seq
    train, fwd = both("train"), both("forward")
    what = f"Training throughput: forward + backward + AdamW step, batch {batch} x {seq}"
    rows.append(rate_row("train_tokens_per_s", what, tok, "tokens/s", *train))
    rows.append(rate_row("train_batches_per_s", what, 1, "batches/s", *train))
    what = f"Forward-only throughput: logits at every position, no autograd, batch {batch} x {seq}"
    rows.append(rate_row("forward_tokens_per_s", what, tok, "tokens/s", *fwd))
    rows.append(rate_row("forward_batches_per_s", what, 1, "batches/s", *fwd))

    say("decode (batch 1, KV cache, greedy) and time to first token")
    dec = both("decode")
    new = inp.new_tokens
    what = f"Decode: batch 1, KV cache, greedy, {PROMPT_TOKENS}-token prompt, {new} new tokens (prefill included)"
    rows.append(rate_row("decode_tokens_per_s", what, new, "tokens/s", *dec))
    dec = [d.scaled(NEW_TOKENS / new) for d in dec]
    rows.append(
        time_row(
            "latency_per_100_tokens_s", f"Generation latency per {NEW_TOKENS} tokens (the decode runs)", *dec
        )
    )
    rows.append(
        time_row(
            "ttft_s", f"Time to first token: {seq}-token prompt, prefill + one greedy pick", *both("ttft")
        )
    )

    say("perplexity evaluation")
    n_eval = len(inp.eval_tokens) - 1
    what = (
        f"Perplexity evaluation: sliding_window_nll, context = stride = {seq}, {n_eval} tokens, batch {batch}"
    )
    rows.append(rate_row("eval_tokens_per_s", what, n_eval, "tokens/s", *both("eval")))

    say("activation memory" + (" (fresh processes)" if device.type == "cpu" and backend == "torch" else ""))
    if backend == "mlx":
        act = ours["activation"]()
    else:
        act = measure_activation_memory(cfg, batch, seq, dtype, "ours", device)
    act_peer = measure_activation_memory(cfg, batch, seq, dtype, "peer", device) if peer is not None else None
    res.activation = {"ours": act, "peer": act_peer}
    rows.append(
        Row(
            "activation_mib",
            f"Activation memory, measured ({act['method']}), forward + backward, batch {batch} x {seq}",
            act["activation"] / MIB,
            "MiB",
            peer=act_peer["activation"] / MIB if act_peer else None,
            higher_is_better=False,
        )
    )
    rows.append(
        Row(
            "activation_estimate_mib",
            "Activation memory, analytic estimate (`activation_estimate`)",
            activation_estimate(cfg, batch, seq, 4 if dtype == "fp32" else 2) / MIB,
            "MiB",
            higher_is_better=False,
        )
    )

    # efficiency against the ceilings measured above
    peak = roof["peak_gflops"] * 1e9
    fpt = forward_flops_per_token(cfg, n_unique, seq)
    for key, mult, label in (("train", 3.0, "training"), ("forward", 1.0, "forward")):
        r = res.row(f"{key}_tokens_per_s")
        rows.append(
            Row(
                f"mfu_{key}",
                f"MFU {label}: model FLOP/s over the measured matmul peak "
                f"({roof['peak_gflops']:.0f} GFLOP/s)",
                r.value * mult * fpt / peak,
                "fraction",
                peer=r.peer * mult * fpt / peak if r.peer else None,
            )
        )
    bpt = decode_bytes_per_token(n_unique, cfg, PROMPT_TOKENS + new // 2)
    r, bw = res.row("decode_tokens_per_s"), roof["copy_gb_s"] * 1e9
    rows.append(
        Row(
            "decode_bandwidth_fraction",
            f"Decode bandwidth use: {bpt / MIB:.0f} MiB read per token "
            f"(fp32 weights + KV) x tokens/s over the measured copy bandwidth ({roof['copy_gb_s']:.1f} GB/s)",
            r.value * bpt / bw,
            "fraction",
            peer=r.peer * bpt / bw if r.peer else None,
        )
    )
    res.load_average = {"start": load0, "end": list(os.getloadavg())}
    res.seconds = time.perf_counter() - t_start
    return res


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
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _cell(v: float | None, lo: float | None, hi: float | None, unit: str) -> str:
    s = fmt(v, unit)
    if lo is not None and hi is not None and s:
        s += f" ({fmt(lo, unit)}–{fmt(hi, unit)})"
    return s


def markdown_table(res: BenchResult) -> str:
    """The card's layout (Metric | Value), with peer and ratio columns when a peer ran."""
    peers = any(r.peer is not None for r in res.rows)
    head = "| Metric | Value |" + (f" {PEER_NAME} | Ours / peer |" if peers else "")
    lines = [head, "|" + "---|" * (4 if peers else 2)]
    for r in res.rows:
        line = f"| {r.metric} | {_cell(r.value, r.lo, r.hi, r.unit)} {r.unit if r.unit != 'fraction' else ''}".rstrip()
        line += " |"
        if peers:
            ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
            line += f" {_cell(r.peer, r.peer_lo, r.peer_hi, r.unit)} | {ratio} |"
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
    return "\n".join(lines) + "\n"


def plot_bench(res: BenchResult, path: Path) -> None:
    """Bar chart: each row relative to the peer (peer = 1) when a peer ran, else our timed rates (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = [r for r in res.rows if r.ratio is not None and not r.key.startswith(("params", "weights"))]
    rows = peers or [r for r in res.rows if r.unit in ("tokens/s", "batches/s")]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    labels = [r.key for r in rows]
    ys = range(len(rows))
    if peers:
        ax.barh([y + 0.2 for y in ys], [r.ratio for r in rows], height=0.4, label="nanogpt")
        ax.barh([y - 0.2 for y in ys], [1.0] * len(rows), height=0.4, label=PEER_NAME)
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("relative to the peer (peer = 1; latency rows: lower is better)")
        for y, r in zip(ys, rows, strict=True):
            ax.text(r.ratio, y + 0.2, f" {r.ratio:.2f}", va="center", fontsize=8)
    else:
        ax.barh(list(ys), [r.value for r in rows])
        ax.set_xscale("log")
        ax.set_xlabel("per second (log scale)")
    ax.set_yticks(list(ys), labels)
    ax.invert_yaxis()
    ax.set_title(
        f"nanogpt bench: {res.settings['backend']} {res.settings['dtype']}, "
        f"batch {res.settings['batch']} x {res.settings['seq']}, {res.machine['cpu']}",
        fontsize=9,
    )
    if peers:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_outputs(res: BenchResult, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res.to_dict(), indent=2) + "\n")
    (out / "bench.md").write_text(markdown_table(res))
    plot_bench(res, out / "bench.png")
    return out


# --- command ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="nanogpt bench",
        description="The model card's benchmark table, each row measured for what it says.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a checkpoint or run folder")
    src.add_argument("--preset", choices=list(PRESETS), help="a named config, random init (default: card)")
    p.add_argument("--backend", default="torch", choices=["torch", "mlx"], help="whose rows to measure")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="fp32, or bf16 autocast")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--peers", action="store_true", help="also run HF GPT2LMHeadModel at the same shapes")
    p.add_argument(
        "--out", default="bench", help="folder for bench.json, bench.md, bench.png (default: bench)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row after one warm-up (default: 3)")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch (default: 4, the card's)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default: 512, the card's)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.model:
        from nanogpt.checkpoint import load_model

        model = load_model(args.model, device)
    else:
        from nanogpt.model import NanoGPTLMHeadModel

        torch.manual_seed(0)
        model = NanoGPTLMHeadModel(preset(args.preset or "card")).to(device)
    seq = min(args.seq, model.config.context_length)
    res = run_bench(
        model,
        batch=args.batch,
        seq=seq,
        dtype=args.dtype,
        repeats=args.repeats,
        peers=args.peers,
        backend=args.backend,
        progress=lambda s: print(f"[bench] {s}", file=sys.stderr, flush=True),
    )
    out = write_outputs(res, args.out)
    print(markdown_table(res))
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'} ({res.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
