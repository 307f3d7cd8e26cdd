"""What `nanogpt bench` runs: our model (PyTorch or MLX) and the Hugging Face GPT-2 peer, and the
activation-memory probe (a fresh subprocess on CPU).

`Runner` is the hook between a model and the table: the few things a timed row can ask of a model (a
training step, a forward pass, a greedy decode, a sliding-window eval), each done on the same `Inputs`, so
ours and the peer do the very same work. `bench.table` turns a runner's methods into the table's rows.

    ours = TorchRunner(model, Inputs.make(cfg, 4, 512, 4), "fp32", torch.device("cpu"))
    ours.train(); ours.generate(prompt, 100); ours.mean_nll(stride=256)
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from nanogpt.bench.measure import NEW_TOKENS, PROMPT_TOKENS
from nanogpt.config import ModelConfig, TrainConfig
from nanogpt.errors import UserError, missing_extra
from nanogpt.infer.sampling import SamplingParams
from nanogpt.kernels.device import autocast
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.optim import LossFn, cross_entropy_loss, make_optimizer, optimizer_step

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

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    @property
    def seq(self) -> int:
        return int(self.x.shape[1])

    @property
    def n_eval(self) -> int:
        """Tokens the eval rows score: every eval token but the first (it has no history)."""
        return len(self.eval_tokens) - 1


class Runner(Protocol):
    """What one model does for the table's timed rows, on the `Inputs` it was made with."""

    def train(self) -> None:
        """One training step as in `train.loop`: forward (dropout on), fp32 loss, backward, clip, AdamW."""

    def forward(self) -> None:
        """Logits at every position of the batch, eval mode, no autograd."""

    def generate(self, prompt: list[int], new_tokens: int) -> int:
        """Greedy decode at batch 1 with the KV cache, prefill included; returns the new tokens made."""

    def mean_nll(self, stride: int) -> float:
        """The eval tokens' mean NLL over sliding windows of `seq` tokens at `stride`, `batch` at a time."""


def greedy(new_tokens: int) -> SamplingParams:
    """The decode workloads: greedy, so every backend does the same work for the same tokens."""
    return SamplingParams(max_tokens=new_tokens, temperature=0)


def _logits(model: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits  # ours: a tensor; HF: an output object


def peer_loss(model: Callable[..., Any], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The peer's training loss as HF computes it: fp32 cross-entropy of its (B, T, V) logits."""
    logits = _logits(model, x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


class _TorchTraining:
    """The training step and forward pass of a PyTorch model (ours or the peer), differing only in the loss.

    With `compile`, both go through `torch.compile(model)` (the warm-up run pays for the compilation).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        inp: Inputs,
        dtype: str,
        device: torch.device,
        loss_fn: LossFn,
        compile: bool,
    ) -> None:
        self.model, self.inp, self.dtype, self.device, self.loss_fn = model, inp, dtype, device, loss_fn
        self.tcfg = TrainConfig()
        self.x, self.y = inp.x.to(device), inp.y.to(device)
        self.opt = make_optimizer(model, self.tcfg, device)
        self.net: Callable[..., Any] = torch.compile(model) if compile else model

    def train(self) -> None:  # dropout on, as in training
        self.model.train()
        with autocast(self.device, self.dtype):
            loss = self.loss_fn(self.net, self.x, self.y)
        loss.backward()
        optimizer_step(self.model, self.opt, self.tcfg.learning_rate, self.tcfg.grad_clip)

    def forward(self) -> None:
        self.model.eval()
        with torch.inference_mode(), autocast(self.device, self.dtype):
            _logits(self.net, self.x)


class TorchRunner(_TorchTraining):
    """Our PyTorch model: `train.loop`'s step, `infer.generate.decode_steps`, `infer.evaluate.sliding_window_nll`."""

    def __init__(
        self, model: NanoGPTLMHeadModel, inp: Inputs, dtype: str, device: torch.device, compile: bool = False
    ) -> None:
        super().__init__(model, inp, dtype, device, cross_entropy_loss, compile)
        self.ours = model

    def generate(self, prompt: list[int], new_tokens: int) -> int:
        from nanogpt.infer.generate import decode_steps

        return sum(1 for _ in decode_steps(self.ours, prompt, greedy(new_tokens), dtype=self.dtype))

    def mean_nll(self, stride: int) -> float:
        from nanogpt.infer.evaluate import sliding_window_nll

        inp = self.inp
        return sliding_window_nll(
            self.ours, inp.eval_tokens, context=inp.seq, stride=stride, batch_size=inp.batch, dtype=self.dtype
        ).mean_nll


def overlap_stride(seq: int) -> int:
    """The stride of the overlapping-window eval row: half the window, so each token has >= seq/2 history."""
    return max(1, seq // 2)


def peer_model(cfg: ModelConfig) -> torch.nn.Module:
    """HF GPT2LMHeadModel with our shapes: random init, no download, tied head, the same dropout."""
    try:
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise missing_extra("--peers needs transformers", "hf") from None
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


class PeerRunner(_TorchTraining):
    """The same work through HF: its training step, `generate` with its KV cache, forward and eval."""

    def __init__(
        self, peer: torch.nn.Module, inp: Inputs, dtype: str, device: torch.device, compile: bool = False
    ) -> None:
        super().__init__(peer, inp, dtype, device, peer_loss, compile)
        self.peer: Any = peer  # a transformers model: `generate` and `.logits` are not in nn.Module's type
        # each prompt goes to the device once, outside the timed runs
        self._ids: dict[tuple[int, ...], torch.Tensor] = {}

    def generate(self, prompt: list[int], new_tokens: int) -> int:
        ids = self._ids.get(tuple(prompt))
        if ids is None:
            ids = self._ids[tuple(prompt)] = torch.tensor([prompt], device=self.device)
        self.peer.eval()
        with torch.inference_mode(), autocast(self.device, self.dtype):
            out = self.peer.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
        return int(out.size(1) - ids.size(1))

    def _score(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
        """HF's sliding-window recipe: logits for the whole window, labels -100 where not scored."""
        x, y, mask = x.to(self.device), y.to(self.device), mask.to(self.device)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            logits = self.peer(x).logits.float()
            labels = y.masked_fill(~mask, -100)
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()

    def mean_nll(self, stride: int) -> float:  # the same windows as sliding_window_nll
        from nanogpt.infer.evaluate import score_windows

        inp = self.inp
        self.peer.eval()
        return score_windows(
            inp.eval_tokens, self._score, context=inp.seq, stride=stride, batch_size=inp.batch
        ).mean_nll


class MLXRunner:
    """The MLX twin of `model` (same weights): compiled train step, forward, decode, eval (fp32 only)."""

    def __init__(self, model: NanoGPTLMHeadModel, inp: Inputs) -> None:
        try:  # fp32 only: run_bench's check_settings refused any other dtype
            import nanogpt.mlx  # noqa: F401 - raises a one-line UserError when MLX is not importable
        except ModuleNotFoundError:
            raise UserError("--backend mlx needs the nanogpt.mlx package, which this install lacks") from None
        import mlx.core as mx

        from nanogpt.mlx.model import NanoGPTLMHeadModel as MLXModel
        from nanogpt.mlx.train.checkpoint import load_state_into
        from nanogpt.mlx.train.optim import make_optimizer, make_train_step
        from nanogpt.train.checkpoint import model_state

        self.mx, self.inp, tcfg = mx, inp, TrainConfig()
        self.m = MLXModel(model.config)
        state = {k: mx.array(v.cpu().float().numpy()) for k, v in model_state(model).items()}
        load_state_into(self.m, state, "model")
        self.opt = make_optimizer(self.m, tcfg)
        self.opt.learning_rate = tcfg.learning_rate
        self.step = make_train_step(self.m, self.opt, tcfg)
        self.x, self.y = (mx.array(t.numpy().astype("int32")) for t in (inp.x, inp.y))

    def train(self) -> None:
        self.m.train()
        loss, norm = self.step(self.x[None], self.y[None])
        self.mx.eval(loss, norm, self.m.parameters(), self.opt.state)

    def forward(self) -> None:
        self.m.eval()
        self.mx.eval(self.m(self.x))

    def generate(self, prompt: list[int], new_tokens: int) -> int:
        from nanogpt.mlx.generate import decode_steps

        return sum(1 for _ in decode_steps(self.m, prompt, greedy(new_tokens)))

    def mean_nll(self, stride: int) -> float:
        from nanogpt.mlx.evaluate import sliding_window_nll

        inp = self.inp
        self.m.eval()
        res = sliding_window_nll(
            self.m, inp.eval_tokens, context=inp.seq, stride=stride, batch_size=inp.batch
        )
        return float(res.mean_nll)

    def activation(self) -> dict[str, Any]:
        """Activation memory from MLX's allocator counters, in process (`measure_activation_memory`'s twin)."""
        import mlx.nn as nn

        from nanogpt.mlx.train.optim import cross_entropy_loss as mlx_loss

        mx, m = self.mx, self.m
        m.train()
        mx.eval(m.parameters(), self.opt.state)
        gc.collect()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(nn.value_and_grad(m, mlx_loss)(m, self.x, self.y))
        peak = mx.get_peak_memory()
        return {
            "method": "MLX get_peak_memory minus active memory before the step",
            "base": base,
            "peak": peak,
            "activation": peak - base,
        }


# --- activation memory --------------------------------------------------------------------------------


PROC_SELF = Path("/proc/self")  # Linux's per-process files; absent on macOS and Windows


def _status_bytes(field: str) -> int:
    """A `kB` line of /proc/self/status (VmRSS: resident now; VmHWM: peak resident) in bytes."""
    for line in (PROC_SELF / "status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). ru_maxrss cannot be reset: it survives exec."""
    try:
        (PROC_SELF / "clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _max_rss() -> int:
    """The process's peak resident memory so far in bytes (getrusage: kB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def activation_method(device: torch.device, backend: str = "torch") -> str:
    """How the activation row will be measured on `device`, checked before any timed row runs.

    CUDA: the allocator's peak. MLX: its own peak counter. MPS: the allocator's memory after the forward pass
    (it keeps no peak). CPU: the peak RSS of a fresh process, reset through /proc on Linux, else getrusage's
    lifetime peak of that process (setup allocates the persistent state first, so the step's peak is what
    grows it). Refused in one line where none of these exists (Windows' CPU).
    """
    if backend == "mlx":
        return "MLX get_peak_memory"
    if device.type == "cuda":
        return "CUDA max_memory_allocated"
    if device.type == "mps":
        return "MPS current_allocated_memory after the forward pass (no peak counter)"
    if (PROC_SELF / "clear_refs").exists():
        return "peak RSS (VmHWM) of a fresh process"
    try:
        import resource  # noqa: F401  (Unix only)
    except ImportError:
        raise UserError(
            "bench cannot measure activation memory on this machine's CPU (no /proc, no getrusage); "
            "run it on Linux, macOS or a CUDA device"
        ) from None
    return "peak RSS (getrusage) of a fresh process, a lower bound (setup's own peak is the base)"


def activation_probe(
    cfg: ModelConfig, batch: int, seq: int, dtype: str, which: str, device: torch.device
) -> dict[str, Any]:
    """Bytes one forward + backward needs beyond the persistent state, measured.

    The persistent state is what lives between training steps: weights, gradients (kept allocated, as
    with zero_grad(set_to_none=False)) and AdamW's two moments, all allocated before the step. On CUDA:
    peak allocated minus allocated before. On CPU, call it in a fresh process (`measure_activation_memory`):
    peak RSS (VmHWM, reset just before the step) minus RSS before.
    """
    torch.manual_seed(0)
    model = (NanoGPTLMHeadModel(cfg) if which == "ours" else peer_model(cfg)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # lr 0: creates exp_avg / exp_avg_sq without moving the weights
    inp = Inputs.make(cfg, batch, seq, 0)
    x, y = inp.x.to(device), inp.y.to(device)
    gc.collect()
    method = activation_method(device)
    base = _memory_before(device)
    with autocast(device, dtype):
        loss = (cross_entropy_loss if which == "ours" else peer_loss)(model, x, y)
    if device.type == "mps":  # no peak counter: what the forward pass keeps for the backward
        torch.mps.synchronize()
        peak = torch.mps.current_allocated_memory()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    elif device.type == "cpu":
        peak = _status_bytes("VmHWM") if "VmHWM" in method else _max_rss()
    return {
        "method": f"{method} minus the same before the step",
        "base": base,
        "peak": peak,
        "activation": peak - base,
    }


def _memory_before(device: torch.device) -> int:
    """The memory counter before the step (and the peak reset where the backend has one)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if device.type == "mps":
        torch.mps.synchronize()
        return torch.mps.current_allocated_memory()
    if _reset_peak_rss():
        return _status_bytes("VmRSS")
    return _max_rss()  # the peak so far: weights, gradients and moments, allocated above


HOP = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"  # a small parent


def measure_activation_memory(
    cfg: ModelConfig, batch: int, seq: int, dtype: str, which: str, device: torch.device
) -> dict[str, Any]:
    """`activation_probe` in this process on CUDA; on CPU in a fresh one (RSS is per process)."""
    if device.type != "cpu":
        return activation_probe(cfg, batch, seq, dtype, which, device)
    code = "import sys; from nanogpt.bench.workloads import probe_main; sys.exit(probe_main(sys.argv[1:]))"
    job = {"cfg": cfg.to_dict(), "batch": batch, "seq": seq, "dtype": dtype, "which": which}
    arg = json.dumps({**job, "threads": torch.get_num_threads()})
    # a fixed mmap threshold: every large tensor is its own mapping, so freeing one lowers the RSS
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    argv = [sys.executable, "-c", code, arg]
    if "getrusage" in activation_method(device):  # a child's peak RSS starts at its parent's (kept across exec):
        argv = [sys.executable, "-c", HOP, *argv]  # start the probe from a small process, not from this one
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"activation-memory subprocess failed: {last}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def probe_main(argv: list[str]) -> int:
    """Entry point of the activation-memory subprocess: one JSON argument in, one JSON line out."""
    a = json.loads(argv[0])
    cfg = ModelConfig.from_dict(a["cfg"])
    torch.set_num_threads(a["threads"])
    print(
        json.dumps(activation_probe(cfg, a["batch"], a["seq"], a["dtype"], a["which"], torch.device("cpu")))
    )
    return 0


# --- the serving peer: HF generate on a static batch ------------------------------------------------------


def peer_static_batch(
    peer: Any,  # a transformers GPT2LMHeadModel: `generate` and `config` are not in nn.Module's type
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    device: torch.device,
    seed: int = 0,
) -> Callable[[], torch.Tensor]:
    """HF `generate` on one static batch: `batch` random prompts of one length (so no padding is needed:
    the static batch's best case), greedy, exactly `new_tokens` new tokens per row (`min_new_tokens` =
    `max_new_tokens`, so no row stops early at EOS). The callable returns the (batch, new_tokens) new ids."""
    from nanogpt.data.tokenizer import EOT_ID

    g = torch.Generator().manual_seed(seed)
    top = min(EOT_ID, peer.config.vocab_size)
    ids = torch.randint(0, top, (batch, prompt_tokens), generator=g).to(device)
    mask = torch.ones_like(ids)

    def run() -> torch.Tensor:
        peer.eval()
        with torch.inference_mode():
            out = peer.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=EOT_ID,
            )
        new: torch.Tensor = out[:, prompt_tokens:]
        return new

    return run
