"""The CUDA paths: bf16 autocast, the TF32 matmuls of a training run, fused AdamW, torch.compile, flash
attention, the fused head loss, the KV cache, decoding with its weight copies and the bench's CUDA memory
counters.

Marked `gpu`, so the default run (`-m 'not slow and not gpu'`) leaves them out; on a CUDA machine run
`pytest -m gpu`. NANOGPT_TEST_DEVICE names another device (e.g. `cpu`) to dry-run their logic without one;
a missing CUDA device is a failure here, not a skip.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from nanogpt.bench.run import run_bench
from nanogpt.config import ModelConfig
from nanogpt.kernels.ops import linear_cross_entropy
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.model.kv_cache import KVCache
from nanogpt.train.checkpoint import load_model
from nanogpt.train.loop import train
from nanogpt.train.optim import make_optimizer
from nanogpt.train.plot import read_log
from tests.tiny import quick_train_config

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def dev() -> torch.device:
    name = os.environ.get("NANOGPT_TEST_DEVICE", "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (or NANOGPT_TEST_DEVICE=cpu for a dry run)")
    return torch.device(name)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def small_cfg(**kw) -> ModelConfig:
    base = dict(d_model=128, n_layers=2, n_heads=4, d_ff=512, context_length=128, dropout=0.0)
    return ModelConfig(**{**base, **kw})


def test_forward_matches_cpu_in_fp32(dev):
    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(small_cfg()).eval()
    x = torch.randint(0, 50257, (2, 128))
    with torch.no_grad():
        ref = model(x)
        out = model.to(dev)(x.to(dev)).cpu()
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_loss_and_grads_match_stock_cross_entropy(dev, dtype):
    torch.manual_seed(0)
    n, d, vocab = 1500, 128, 50257  # three chunks, the last one short
    h = torch.randn(n, d, device=dev, requires_grad=True)
    w = (0.05 * torch.randn(vocab, d, device=dev)).requires_grad_()
    y = torch.randint(0, vocab, (n,), device=dev)
    y[::7] = -100
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours = linear_cross_entropy(h, w, y)
        ours.backward()
        gh, gw = h.grad.clone(), w.grad.clone()
        h.grad = w.grad = None
        ref = F.cross_entropy((h @ w.t()).float(), y)
        ref.backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert abs(ours.item() - ref.item()) / ref.item() < tol
    assert rel_err(gh, h.grad) < tol and rel_err(gw, w.grad) < tol


def test_compiled_loss_and_grads_equal_eager(dev):
    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(small_cfg()).to(dev)
    x, y = (torch.randint(0, 50257, (2, 128), device=dev) for _ in range(2))
    y[0, :7] = -100

    def loss_and_grads(net):
        model.zero_grad(set_to_none=True)
        loss = net(x, targets=y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ref, ref_grads = loss_and_grads(model)
    out, grads = loss_and_grads(torch.compile(model, fullgraph=True))  # fullgraph: no graph breaks
    assert rel_err(out, ref) < 1e-4
    assert max(rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True)) < 1e-3


def test_flash_attention_runs_the_bf16_training_step(dev):
    if dev.type != "cuda":
        pytest.fail("flash attention needs CUDA")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(small_cfg(dropout=0.1)).to(dev).train()
    x = torch.randint(0, 50257, (4, 128), device=dev)
    # only the flash kernel allowed: SDPA raises if the model's attention call cannot use it
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, targets=x)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_kv_cache_decode_matches_the_full_forward(dev):
    torch.manual_seed(0)
    cfg = small_cfg()
    model = NanoGPTLMHeadModel(cfg).to(dev).eval()
    x = torch.randint(0, 50257, (1, 40), device=dev)
    cache = KVCache.for_model(cfg, batch_size=1, device=dev)
    with torch.inference_mode():
        full = model(x)
        steps = [model(x[:, :32], cache=cache)]  # a prefill, then one token at a time
        steps += [model(x[:, i : i + 1], cache=cache) for i in range(32, 40)]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-4


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_decode_steps_match_the_full_forward(dev, dtype):
    from nanogpt.infer.generate import decode_steps
    from nanogpt.infer.sampling import SamplingParams

    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(small_cfg()).to(dev).eval()
    prompt = torch.randint(0, 50257, (12,)).tolist()
    seq, tol = list(prompt), 1e-4 if dtype == "fp32" else 2e-2
    for token, logits in decode_steps(
        model, prompt, SamplingParams(max_tokens=6, temperature=0), dtype=dtype
    ):
        with torch.inference_mode():
            ref = model(torch.tensor([seq], device=dev))[0, -1].float()
        assert rel_err(logits, ref) < tol
        seq.append(token)


def test_adamw_is_fused_on_the_device(dev):
    opt = make_optimizer(NanoGPTLMHeadModel(small_cfg()).to(dev), quick_train_config(), dev)
    assert opt.defaults["fused"] is True


def test_bf16_compiled_training_run_learns_and_resumes(dev, small_data, tmp_path):
    cfg = small_cfg(d_model=64, d_ff=256, context_length=64)
    kw = dict(device=str(dev), dtype="bf16", compile=True, batch_size=8, learning_rate=3e-3, warmup_iters=5)
    run = tmp_path / "run"
    quick = quick_train_config(max_iters=40, eval_interval=20, eval_iters=4, **kw)
    res = train(cfg, quick, small_data, run, progress=False)
    assert res.steps == 40 and res.last_val_loss < res.first_val_loss - 0.5
    res2 = train(cfg, quick_train_config(max_iters=50, eval_interval=25, eval_iters=4, **kw), small_data, run,
                 resume=True, progress=False)  # fmt: skip
    assert res2.steps == 50
    steps = [r["step"] for r in read_log(run / "log.jsonl")]
    assert steps == list(range(51))
    assert next(load_model(run).parameters()).dtype == torch.float32  # bf16 is autocast, weights stay fp32


@pytest.mark.parametrize("dtype,compile", [("fp32", False), ("bf16", True)])
def test_bench_on_the_device_with_a_peer(dev, dtype, compile):
    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(small_cfg()).to(dev)
    res = run_bench(model, batch=2, seq=64, dtype=dtype, repeats=2, warmup=1, peers=True, compile=compile)
    assert res.settings["compile"] is compile
    for row in res.rows:
        assert row.value > 0, row.key
    assert res.row("train_tokens_per_s").ratio > 0
    if dev.type == "cuda":
        assert res.activation["ours"]["method"].startswith("CUDA max_memory_allocated")
        assert res.machine["gpu"]
