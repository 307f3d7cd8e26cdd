"""The eager attention path (`model(idx, attention=[...])`): the weights it returns, and its output equal to the
fast SDPA path's in every precision `nanogpt serve` loads (fp32, bf16 autocast, int8 weights)."""

import copy

import pytest
import torch

from nanogpt.kernels.decode import Decoder
from nanogpt.kernels.quant import apply_dtype
from nanogpt.model.gpt import NanoGPTLMHeadModel, eager_attention
from nanogpt.model.kv_cache import KVCache
from tests.tiny import tiny_config

# Stated bounds, logits of the eager path against the fast path's (max |logit| of this model ~0.7):
# fp32: the same math in another order (measured 1.5e-7); bf16: a bf16 rounding step of an activation can
# land on the other side (one bf16 ulp at 0.5-1 is 3.9e-3; measured 3.9e-3); int8: fp32 attention, but each
# layer's input is rounded to bf16 for the int8 kernel, the same one-ulp flips (measured 2.0e-3).
BOUNDS = {"fp32": 1e-5, "bf16": 1.6e-2, "int8": 1.6e-2}


@pytest.fixture(scope="module")
def model() -> NanoGPTLMHeadModel:
    torch.manual_seed(0)
    return NanoGPTLMHeadModel(tiny_config()).eval()


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_eager_output_equals_the_fast_path(model, dtype):
    m = copy.deepcopy(model)
    decoder = Decoder(m, apply_dtype(m, dtype))  # as `nanogpt serve --dtype` loads it
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    fast = decoder.prefill(idx, None, last_only=False).float()
    maps: list[torch.Tensor] = []
    eager = decoder.prefill(idx, None, last_only=False, attention=maps).float()
    assert (eager - fast).abs().max().item() <= BOUNDS[dtype]
    assert len(maps) == m.config.n_layers
    for w in maps:
        assert w.shape == (2, m.config.n_heads, 64, 64) and w.dtype == torch.float32
        torch.testing.assert_close(w.sum(-1), torch.ones(2, m.config.n_heads, 64), atol=1e-5, rtol=0)
        assert (w.triu(diagonal=1) == 0).all()  # causal: no weight on a later token
    assert not (maps[0] == maps[1]).all()  # each layer its own weights


def test_eager_weights_are_the_softmax_of_the_scores():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    y, w = eager_attention(q, k, v)
    scores = (q @ k.transpose(-2, -1)) / 8**0.5
    scores = scores.masked_fill(torch.ones(5, 5).triu(diagonal=1).bool(), float("-inf"))
    torch.testing.assert_close(w, scores.softmax(-1))
    torch.testing.assert_close(y, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_chunks_over_a_kv_cache_give_the_rows_of_the_whole_map(model):
    """What the engine's attention job does: the prompt in chunks, each chunk's rows against every key so far."""
    idx = torch.randint(0, 50257, (1, 40), generator=torch.Generator().manual_seed(3))
    whole: list[torch.Tensor] = []
    with torch.inference_mode():
        model(idx, attention=whole)
        cache = KVCache.for_model(model.config, 1, max_len=40)
        for lo in range(0, 40, 16):
            part: list[torch.Tensor] = []
            model(idx[:, lo : lo + 16], cache, attention=part)
            for layer, w in enumerate(part):
                hi = min(40, lo + 16)
                torch.testing.assert_close(w, whole[layer][:, :, lo:hi, :hi], atol=1e-6, rtol=0)
