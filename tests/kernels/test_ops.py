"""ops.py: the fused head + cross-entropy equals the stock form; the CPU dropout keeps its rate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanogpt.kernels import ops


@pytest.mark.parametrize("n,vocab", [(37, 50), (300, 1000)])
def test_linear_cross_entropy_matches_stock_loss_and_gradients(n: int, vocab: int, monkeypatch) -> None:
    monkeypatch.setattr(ops, "BUFFER_ELEMENTS", 64 * vocab)  # several chunks, a ragged last one
    torch.manual_seed(0)
    h = torch.randn(n, 16, requires_grad=True)
    w = torch.randn(vocab, 16, requires_grad=True)
    y = torch.randint(0, vocab, (n,))
    y[::5] = -100  # ignored positions
    ref = F.cross_entropy(h @ w.t(), y)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss = ops.linear_cross_entropy(h, w, y)
    (2 * loss).backward()  # the incoming gradient scales both
    assert torch.allclose(loss, ref, atol=1e-5)
    assert torch.allclose(h.grad, 2 * gh, atol=1e-5)
    assert torch.allclose(w.grad, 2 * gw, atol=1e-5)
    with torch.no_grad():
        total = ops.linear_cross_entropy(h, w, y, reduction="sum")
    assert torch.allclose(total, F.cross_entropy(h @ w.t(), y, reduction="sum"), rtol=1e-5)


def test_bf16_cpu_loss_and_gradients_match_stock_autocast(monkeypatch) -> None:
    # bf16 on CPU with gradients: (chunk, vocab) logits, the gradients from the low-precision buffer
    monkeypatch.setattr(ops, "BUFFER_ELEMENTS", 64 * 1000)  # 300 positions: 5 chunks, a ragged last one
    torch.manual_seed(0)
    h = torch.randn(300, 16, requires_grad=True)
    w = torch.randn(1000, 16, requires_grad=True)
    y = torch.randint(0, 1000, (300,))
    y[::5] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h @ w.t()).float(), y)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ops.linear_cross_entropy(h, w, y)
    (3 * loss).backward()
    assert loss.dtype == torch.float32 and torch.allclose(loss, ref, rtol=1e-5)  # the same bf16 logits
    for got, want in ((h.grad, 3 * gh), (w.grad, 3 * gw)):
        assert got.dtype == torch.float32 and got.shape == want.shape and got.is_contiguous()
        assert float((got - want).norm() / want.norm()) < 1e-2  # bf16 rounding of the logits' gradient
    assert not w.grad[:, 0].eq(0).all() and w.grad[y[y >= 0]].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_grad_cpu_loss_matches_stock_loss(dtype, monkeypatch) -> None:
    # fp32: the blocked online softmax; bf16: row chunks and a stock log-softmax
    monkeypatch.setattr(ops, "NLL_BLOCK", 7)  # 143 vocabulary rows: 21 tiles, a ragged last one
    monkeypatch.setattr(ops, "NLL_ROWS", 16)  # 70 positions: 5 row chunks, a ragged last one
    torch.manual_seed(0)
    h, w = 3 * torch.randn(70, 16), torch.randn(143, 16)
    y = torch.randint(0, 143, (70,))
    y[::6] = -100
    y[1], y[2] = 0, 142  # the first and the last vocabulary row as targets
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        total = ops.linear_cross_entropy(h, w, y, reduction="sum")
        mean = ops.linear_cross_entropy(h, w, y)
        each = ops.linear_cross_entropy(h, w, y, reduction="none")
        ref = F.cross_entropy((h @ w.t()).float(), y, reduction="sum")
        ref_each = F.cross_entropy((h @ w.t()).float(), y, reduction="none")
    fp32 = F.cross_entropy(h @ w.t(), y, reduction="sum")
    assert torch.allclose(total, ref, rtol=1e-5)
    # per position (evaluation per document): the same values, 0 at ignored positions
    assert each.shape == (70,) and torch.allclose(each, ref_each, rtol=1e-5, atol=1e-5)
    assert bool((each[::6] == 0).all()) and torch.allclose(each.sum(), total, rtol=1e-6)
    if dtype == torch.bfloat16:  # the matmul really ran in bf16: near fp32, but not within fp32 rounding
        assert torch.allclose(total, fp32, rtol=1e-2) and not torch.allclose(total, fp32, rtol=1e-5)
    assert torch.allclose(mean, total / (y != -100).sum(), rtol=1e-6)


def test_per_position_loss_is_for_evaluation_only() -> None:
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8)
    with pytest.raises(ValueError, match="torch.no_grad"):
        ops.linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), reduction="none")


def test_model_loss_with_targets_equals_cross_entropy_of_logits() -> None:
    from nanogpt.config import preset
    from nanogpt.model.gpt import NanoGPTLMHeadModel

    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(preset("tiny")).eval()
    x, y = torch.randint(0, 50257, (2, 9)), torch.randint(0, 50257, (2, 9))
    logits = model(x)
    ref = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    assert torch.allclose(model(x, targets=y), ref, atol=1e-5)


def test_dropout_rate_scale_and_gradient() -> None:
    torch.manual_seed(0)
    x = torch.ones(400, 500, requires_grad=True)
    out = ops.dropout(x, 0.1, True)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.005
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.9))
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # d(out)/dx is the scaled mask itself
    assert ops.dropout(x, 0.1, False) is x


@pytest.mark.parametrize("n_blocks", [1, 3, 4, 7])
def test_causal_attention_without_dropout_matches_sdpa(n_blocks: int) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, requires_grad=True) for _ in range(3))  # 7 rows: ragged blocks
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.manual_seed(1)
    got = ops.blocked_causal_attention(q, k, v, 1e-9, n_blocks=n_blocks)  # p ~ 0: the mask keeps everything
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    assert torch.allclose(got, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-5)


@pytest.mark.parametrize("past", [0, 4, 6])
def test_causal_attention_after_a_cached_prefix_sees_the_prefix(past: int) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # all 7 positions at once
    got = ops.causal_attention(q[:, :, past:], k, v)  # the last 7 - past queries against every key so far
    torch.testing.assert_close(got, ref[:, :, past:], atol=1e-6, rtol=1e-6)
