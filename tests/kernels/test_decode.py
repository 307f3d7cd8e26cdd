"""decode.py: which weights and kernels each `Decoder` call uses, and that its logits are the model's.

The decode loop's own tests (copies kept across streams, pickling, two threads taking turns, oneDNN
restored) are in tests/infer/test_generate.py, which drives the decoder through `decode_steps`.
"""

from __future__ import annotations

import pytest
import torch

from nanogpt.errors import UserError
from nanogpt.kernels import decode
from nanogpt.kernels.decode import DecodeLinear, Decoder
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.model.kv_cache import KVCache, SlotKVCache

PROMPT = [464, 3290, 286, 4881, 318, 6342, 11, 290]


def record_step_dtype(model: NanoGPTLMHeadModel) -> list[torch.dtype | None]:
    """The copies' dtype each call of the head sees (None: the stock weights)."""
    seen: list[torch.dtype | None] = []
    model.lm_head.register_forward_pre_hook(lambda *_: seen.append(decode._STEP_DTYPE.get()))
    return seen


def test_prefill_uses_stock_weights_and_steps_the_copies(model: NanoGPTLMHeadModel) -> None:
    Decoder(model).release()  # no copies left by another test
    decoder = Decoder(model, copy_rows=2)
    seen = record_step_dtype(model)
    cache = KVCache.for_model(model.config, batch_size=3, dtype=decoder.cache_dtype)
    decoder.prefill(torch.tensor([PROMPT] * 3), cache)
    assert seen == [None] and not any(isinstance(m, DecodeLinear) for m in model.modules())  # not made yet
    decoder.step(torch.tensor([[11], [12], [13]]), cache)  # 3 rows > copy_rows: the stock weights
    assert seen[-1] is None
    slots = SlotKVCache.for_model(model.config, slots=2, dtype=decoder.cache_dtype)
    decoder.prefill(torch.tensor([PROMPT] * 2), slots.rows(0, [len(PROMPT)] * 2))
    decoder.step(torch.tensor([[11], [12]]), slots.rows(0, [1, 1]))  # 2 rows: the copies, made now
    assert seen[-1] is torch.float32 and isinstance(model.lm_head, DecodeLinear)
    assert decode._STEP_DTYPE.get() is None  # only during the call
    decoder.release()
    assert not any(isinstance(m, DecodeLinear) for m in model.modules())


def test_step_logits_are_the_models(model: NanoGPTLMHeadModel) -> None:
    decoder = Decoder(model)
    cache = KVCache.for_model(model.config, batch_size=1, dtype=decoder.cache_dtype)
    decoder.prefill(torch.tensor([PROMPT[:-1]]), cache)
    stepped = decoder.step(torch.tensor([PROMPT[-1:]]), cache)  # (1, 1, V) through the copies
    with torch.no_grad():
        full = model(torch.tensor([PROMPT]))[:, -1:]  # (1, 1, V) with no cache
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
    scored = decoder.prefill(torch.tensor([PROMPT]), None, last_only=False)  # a scoring forward
    assert scored.shape == (1, len(PROMPT), model.config.vocab_size)
    decoder.release()


def test_calls_leave_no_mode_behind(model: NanoGPTLMHeadModel) -> None:
    decoder = Decoder(model, "bf16")
    assert decoder.cache_dtype == torch.bfloat16 and decoder.device == torch.device("cpu")
    cache = KVCache.for_model(model.config, batch_size=1, dtype=decoder.cache_dtype)
    first = decoder.prefill(torch.tensor([PROMPT]), cache)
    nxt = decoder.step(torch.tensor([[int(first[0, -1].argmax())]]), cache)
    assert first.is_inference() and nxt.dtype == torch.bfloat16  # inference mode and autocast inside
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.enabled
    decoder.release()


def test_unknown_precision_is_refused(model: NanoGPTLMHeadModel) -> None:
    with pytest.raises(UserError, match="unknown dtype 'fp8'"):
        Decoder(model, "fp8")
