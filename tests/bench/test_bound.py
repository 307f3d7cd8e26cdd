"""The memory bound of a decode step: `decode_step_bytes` against the tensors a real step reads.

A tiny model is put in each precision the way `sample` and `serve` do (`apply_dtype`, then a `Decoder`),
a real KV cache is filled to the rows' positions, one real decode step runs, and the bytes of what its
layers multiply by, the rows it looks up and the keys/values it attends to are summed from their `nbytes`.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from nanogpt.bench.measure import decode_step_bytes, memory_bound_tokens_per_s
from nanogpt.config import ModelConfig
from nanogpt.kernels.decode import DecodeLinear, Decoder
from nanogpt.kernels.quant import Int8Embedding, Int8Linear, apply_dtype
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.model.kv_cache import SlotKVCache
from tests.tiny import tiny_config

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
VARIANTS = {"tied, biases": {}, "untied, no biases": {"tie_embeddings": False, "bias": False}}


@pytest.fixture
def one_thread():
    """One CPU thread: fp32 decode copies are then one column block, with no zero padding to tell apart
    (padding is a layout's, not something a step must read, and the formula leaves it out)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def layer_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """What the model's layers hold for a decode step in `dtype`: a Linear's decode copy of that dtype when
    it holds one (its forward then multiplies by it), else its own weight and bias; an int8 layer's int8
    weight, scales and bias; a LayerNorm's weight and bias. Embeddings are looked up a row at a time and
    counted by `lookup_bytes`; any other module holding tensors fails the test (a layer the sum forgot)."""
    total = 0
    for m in model.modules():
        own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        if isinstance(m, DecodeLinear) and dtype in m.decode_copies:
            _, w, b, _ = m.decode_copies[dtype]
            tensors = [w, b]
        elif isinstance(m, (nn.Linear, nn.LayerNorm)):
            tensors = [m.weight, m.bias]
        elif isinstance(m, Int8Linear):
            tensors = [m.weight_int8, m.scale, m.bias]
        else:
            assert isinstance(m, nn.Embedding | Int8Embedding) or not own, type(m)
            continue
        total += sum(t.nbytes for t in tensors if t is not None)
    return total


def lookup_bytes(model: NanoGPTLMHeadModel, tokens: torch.Tensor, pos: torch.Tensor) -> int:
    """The token and position rows the step looks up: tokens (B, 1), pos (B, 1)."""
    table = model.transformer.token_embedding
    if isinstance(table, Int8Embedding):  # the head's int8 rows and their scales
        token = table.table[0].weight_int8[tokens].nbytes + table.table[0].scale[tokens].nbytes
    else:
        token = table.weight[tokens].nbytes
    return token + model.transformer.position_embedding.weight[pos].nbytes


def one_step(cfg: ModelConfig, dtype: str, positions: list[int], copy_rows: int = 64) -> int:
    """Bytes one real decode step reads: rows at `positions` keys (what was cached, then its new token)."""
    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(cfg).eval()
    decoder = Decoder(model, apply_dtype(model, dtype), copy_rows=copy_rows)  # as sample and serve do
    rows = len(positions)
    cache = SlotKVCache.for_model(cfg, rows, "cpu", decoder.cache_dtype)
    prompt = torch.randint(0, cfg.vocab_size, (rows, max(positions) - 1))
    decoder.prefill(prompt, cache.rows(0, [p - 1 for p in positions]))  # left-padded rows
    tokens = torch.randint(0, cfg.vocab_size, (rows, 1))
    decoder.step(tokens, cache.rows(0, [1] * rows))
    assert cache.lengths == positions  # the cache now holds exactly the keys the step read
    kv = sum(cache.k[:, b, :, :p].nbytes + cache.v[:, b, :, :p].nbytes for b, p in enumerate(positions))
    pos = torch.tensor(positions)[:, None] - 1
    return layer_bytes(model, decoder.cache_dtype) + lookup_bytes(model, tokens, pos) + kv


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", PRECISIONS)
def test_step_bytes_equal_what_a_real_step_reads(dtype, variant, one_thread):
    cfg = tiny_config(**VARIANTS[variant])
    for positions in ([5], [3, 9, 17]):  # one stream; a serving batch, each row at its own position
        assert decode_step_bytes(cfg, dtype, positions) == one_step(cfg, dtype, positions), positions


def test_above_the_copy_rows_a_step_reads_the_stock_weights(one_thread):
    """bf16 with more rows than `copy_rows`: no copies are made, autocast reads the fp32 weights."""
    cfg = tiny_config()
    got = one_step(cfg, "bf16", [4, 6, 7], copy_rows=2)
    assert decode_step_bytes(cfg, "bf16", [4, 6, 7], copy_rows=2) == got
    assert decode_step_bytes(cfg, "bf16", [4, 6, 7]) < got  # the copies' half-size weights


def test_precisions_order_and_the_cache_grows_per_row():
    cfg = replace(tiny_config(), vocab_size=1000)
    fp32, bf16, int8 = (decode_step_bytes(cfg, d, [10]) for d in ("fp32", "bf16", "int8"))
    assert int8 < bf16 < fp32
    assert decode_step_bytes(cfg, "fp16", [10]) == bf16
    per_key = 2 * cfg.n_layers * cfg.d_model  # keys and values of every layer, elements
    assert decode_step_bytes(cfg, "int8", [11]) - int8 == per_key * 4  # int8 keeps an fp32 cache
    assert decode_step_bytes(cfg, "bf16", [11]) - bf16 == per_key * 2
    # a second row at its own position adds its cache and its two looked-up rows, not the weights again
    two = decode_step_bytes(cfg, "fp32", [10, 30])
    assert two - fp32 == per_key * 4 * 30 + 2 * cfg.d_model * 4
    with pytest.raises(ValueError, match="unknown decode dtype 'int4'"):
        decode_step_bytes(cfg, "int4", [10])


def test_bound_is_rows_times_bandwidth_over_bytes():
    assert memory_bound_tokens_per_s(1, 1e8, 10.0) == pytest.approx(100.0)  # 10 GB/s over 100 MB a step
    assert memory_bound_tokens_per_s(16, 2e8, 10.0) == pytest.approx(800.0)  # 16 tokens a step
