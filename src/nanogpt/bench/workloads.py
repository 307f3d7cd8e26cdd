"""What `nanogpt bench` runs: our model (PyTorch or MLX) and the Hugging Face GPT-2 peer, row by row,
and the activation-memory probe (a fresh subprocess on CPU).

Each `*_fns` returns callables keyed by row (train step, forward, decode, time to first token, eval) on
the same `Inputs`, so ours and the peer do the very same work.

    fns = torch_fns(model, Inputs.make(cfg, 4, 512, 4), "fp32", torch.device("cpu"))
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
from typing import Any

import torch
import torch.nn.functional as F

from nanogpt.bench.measure import NEW_TOKENS, PROMPT_TOKENS
from nanogpt.config import ModelConfig, TrainConfig
from nanogpt.errors import UserError, missing_extra
from nanogpt.infer.sampling import SamplingParams
from nanogpt.kernels.device import autocast
from nanogpt.train.optim import LossFn, cross_entropy_loss

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


def greedy(new_tokens: int) -> SamplingParams:
    """The decode workloads: greedy, so every backend does the same work for the same tokens."""
    return SamplingParams(max_tokens=new_tokens, temperature=0)


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits  # ours: a tensor; HF: an output object


def peer_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The peer's training loss as HF computes it: fp32 cross-entropy of its (B, T, V) logits."""
    logits = _logits(model, x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


def train_and_forward(
    model: torch.nn.Module, inp: Inputs, dtype: str, device: torch.device, loss_fn: LossFn, compile: bool
) -> dict[str, Callable]:
    """A training step (as in `train.loop`: fp32 loss, clip at 1.0, AdamW) and an inference forward.

    With `compile`, both go through `torch.compile(model)` (the warm-up run pays for the compilation).
    """
    from nanogpt.train.optim import make_optimizer, optimizer_step

    tcfg = TrainConfig()
    x, y = inp.x.to(device), inp.y.to(device)
    opt = make_optimizer(model, tcfg, device)
    net = torch.compile(model) if compile else model

    def train() -> None:  # dropout on, as in training
        model.train()
        with autocast(device, dtype):
            loss = loss_fn(net, x, y)
        loss.backward()
        optimizer_step(model, opt, tcfg.learning_rate, tcfg.grad_clip)

    def forward() -> None:  # logits at every position, eval mode, no autograd
        model.eval()
        with torch.inference_mode(), autocast(device, dtype):
            _logits(net, x)

    return {"train": train, "forward": forward}


def torch_fns(
    model: torch.nn.Module, inp: Inputs, dtype: str, device: torch.device, compile: bool = False
) -> dict[str, Callable]:
    from nanogpt.infer.evaluate import sliding_window_nll
    from nanogpt.infer.generate import decode_steps

    seq, batch = inp.x.shape[1], inp.x.shape[0]

    def decode(prompt: list[int], new: int) -> Callable[[], int]:
        return lambda: sum(1 for _ in decode_steps(model, prompt, greedy(new), dtype=dtype))

    return {
        **train_and_forward(model, inp, dtype, device, cross_entropy_loss, compile),
        "decode": decode(inp.decode_prompt, inp.new_tokens),
        "ttft": decode(inp.prompt, 1),
        "eval": lambda: sliding_window_nll(
            model, inp.eval_tokens, context=seq, stride=seq, batch_size=batch, dtype=dtype
        ),
        "eval_overlap": lambda: sliding_window_nll(
            model, inp.eval_tokens, context=seq, stride=overlap_stride(seq), batch_size=batch, dtype=dtype
        ),
    }


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


def peer_fns(
    peer: torch.nn.Module, inp: Inputs, dtype: str, device: torch.device, compile: bool = False
) -> dict[str, Callable]:
    """The same work through HF: its training step, `generate` with its KV cache, forward and eval."""
    from nanogpt.infer.evaluate import score_windows

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

    def score(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
        """HF's sliding-window recipe: logits for the whole window, labels -100 where not scored."""
        x, y, mask = x.to(device), y.to(device), mask.to(device)
        with torch.inference_mode(), autocast(device, dtype):
            logits = peer(x).logits.float()
            labels = y.masked_fill(~mask, -100)
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()

    def evaluate(stride: int) -> Callable[[], float]:  # the same windows as sliding_window_nll
        def run() -> float:
            peer.eval()
            res = score_windows(inp.eval_tokens, score, context=seq, stride=stride, batch_size=batch)
            return res.mean_nll

        return run

    return {
        **train_and_forward(peer, inp, dtype, device, peer_loss, compile),
        "decode": decode(inp.decode_prompt, inp.new_tokens),
        "ttft": decode(inp.prompt, 1),
        "eval": evaluate(seq),
        "eval_overlap": evaluate(overlap_stride(seq)),
    }


def mlx_fns(model: torch.nn.Module, inp: Inputs, dtype: str) -> dict[str, Callable]:
    """The MLX twin of `model` (same weights) and its rows: compiled train step, forward, decode, eval."""
    try:  # fp32 only: run_bench's check_settings refused any other dtype
        import nanogpt.mlx  # noqa: F401 - raises a one-line UserError when MLX is not importable
    except ModuleNotFoundError:
        raise UserError("--backend mlx needs the nanogpt.mlx package, which this install lacks") from None
    import mlx.core as mx

    from nanogpt.mlx.evaluate import sliding_window_nll as sliding_window_nll_mlx
    from nanogpt.mlx.generate import decode_steps
    from nanogpt.mlx.model import NanoGPTLMHeadModel as MLXModel
    from nanogpt.mlx.train.checkpoint import load_state_into
    from nanogpt.mlx.train.optim import make_optimizer, make_train_step
    from nanogpt.train.checkpoint import model_state

    cfg, tcfg = model.config, TrainConfig()
    m = MLXModel(cfg)
    load_state_into(m, {k: mx.array(v.cpu().float().numpy()) for k, v in model_state(model).items()}, "model")
    opt = make_optimizer(m, tcfg)
    opt.learning_rate = tcfg.learning_rate
    step = make_train_step(m, opt, tcfg)
    x, y = mx.array(inp.x.numpy().astype("int32")), mx.array(inp.y.numpy().astype("int32"))
    seq, batch = inp.x.shape[1], inp.x.shape[0]

    def train() -> None:
        m.train()
        loss, norm = step(x[None], y[None])
        mx.eval(loss, norm, m.parameters(), opt.state)

    def forward() -> None:
        m.eval()
        mx.eval(m(x))

    def decode(prompt: list[int], new: int) -> Callable[[], int]:
        return lambda: sum(1 for _ in decode_steps(m, prompt, greedy(new)))

    def evaluate(stride: int) -> Callable[[], float]:
        def run() -> float:
            m.eval()
            res = sliding_window_nll_mlx(m, inp.eval_tokens, context=seq, stride=stride, batch_size=batch)
            return res.mean_nll

        return run

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
        "eval": evaluate(seq),
        "eval_overlap": evaluate(overlap_stride(seq)),
        "activation": activation,
    }


def nn_value_and_grad(m: Any) -> Callable:
    import mlx.nn as nn

    from nanogpt.mlx.train.optim import cross_entropy_loss

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
    from nanogpt.model.gpt import NanoGPTLMHeadModel

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
        loss = (cross_entropy_loss if which == "ours" else peer_loss)(model, x, y)
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
    code = "import sys; from nanogpt.bench.workloads import probe_main; sys.exit(probe_main(sys.argv[1:]))"
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


# --- the serving peer: HF generate on a static batch ------------------------------------------------------


def peer_static_batch(
    peer: torch.nn.Module,
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
        return out[:, prompt_tokens:]

    return run
