"""The chunked distillation loss equals the loss on full logits, values and gradients, for every divergence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nanogpt.distill.chunked as chunked
from nanogpt.distill.chunked import IGNORE, Mix, chunked_distill_parts
from nanogpt.distill.losses import divergence

N, D, DT, V = 37, 16, 24, 101  # positions, student width, teacher width, vocabulary


def reference(h, w, t_h, t_w, y, alpha, T, div, beta):
    """The unchunked loss on (N, V) logits, means over the scored positions."""
    s, t = h @ w.t(), t_h @ t_w.t()
    valid = y != IGNORE
    hard = F.cross_entropy(s, y, ignore_index=IGNORE)
    d = divergence(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1), div, beta)
    soft = T * T * d[valid].mean()
    return alpha * hard + (1 - alpha) * soft, hard, soft


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g, dtype=torch.float64).float()
    w = torch.randn(V, D, generator=g) * 0.5
    t_h, t_w = torch.randn(N, DT, generator=g), torch.randn(V, DT, generator=g) * 0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[[3, 10, 11, 30]] = IGNORE  # unscored positions (padding)
    return h, w, t_h, t_w, y


@pytest.mark.parametrize("div", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("budget", [V * 5, V * 1000])  # several chunks (the last one short), or one
def test_values_and_gradients_equal_the_unchunked_loss(inputs, monkeypatch, div, T, budget):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", budget)
    h, w, t_h, t_w, y = inputs
    alpha, beta = 0.3, 0.4
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    total_r, hard_r, soft_r = reference(hr, wr, t_h, t_w, y, alpha, T, div, beta)
    total_r.backward()
    hc, wc = h.clone().requires_grad_(), w.clone().requires_grad_()
    parts = chunked_distill_parts((hc, wc), (t_h, t_w), y, Mix(alpha, T, div, beta))
    (2.0 * parts.total).backward()  # an upstream gradient other than 1 scales both gradients
    torch.testing.assert_close(parts.total, total_r.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts.hard, hard_r.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts.soft, soft_r.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hc.grad, 2.0 * hr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wc.grad, 2.0 * wr.grad, atol=1e-5, rtol=1e-5)
    assert hc.grad[y == IGNORE].abs().max() == 0  # ignored positions get no gradient


def test_without_gradients_the_value_is_the_same(inputs):
    h, w, t_h, t_w, y = inputs
    with torch.no_grad():
        parts = chunked_distill_parts((h, w), (t_h, t_w), y, Mix(0.5, 2.0))
    torch.testing.assert_close(parts.total, reference(h, w, t_h, t_w, y, 0.5, 2.0, "forward_kl", 0.5)[0])


def test_a_batch_of_windows_is_flattened(inputs):
    h, w, t_h, t_w, y = inputs
    flat = chunked_distill_parts((h[:36], w), (t_h[:36], t_w), y[:36])
    shaped = chunked_distill_parts((h[:36].view(4, 9, D), w), (t_h[:36].view(4, 9, DT), t_w), y[:36].view(4, 9))
    torch.testing.assert_close(flat.total, shaped.total)
