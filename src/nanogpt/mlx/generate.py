"""Sampling from an MLX model with the KV cache, as a generator of token ids (mirrors `nanogpt.infer.generate`).

The policy is the PyTorch one: temperature 0 is greedy, otherwise logits / temperature, then top-k
(exactly k kept), then top-p on what is left, then one draw. Randomness comes from an explicit MLX PRNG
key seeded by `seed` and split once per token, so the same seed gives the same tokens whatever else uses
`mx.random` (the draws differ from torch's: the two PRNGs are different). The prompt is prefilled into
the preallocated `KVCache` once, then one token per step; when the cache is full the window slides (the
last `context_length // 2` tokens are re-prefilled into the reset cache), as in PyTorch. The settings are
the shared `SamplingParams` (checked when made); prompt rules are shared with `nanogpt.infer.generate`.

    ids = list(generate(model, tok.encode("Once upon a time"), SamplingParams(max_tokens=100, seed=1337)))
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence

import mlx.core as mx

from nanogpt.data.tokenizer import EOT_ID
from nanogpt.infer.generate import prepare_prompt, tokens_until
from nanogpt.infer.sampling import SamplingParams
from nanogpt.mlx.kv_cache import KVCache
from nanogpt.mlx.model import NanoGPTLMHeadModel


def top_k_filter(logits: mx.array, k: int | None) -> mx.array:
    """Keep exactly the k largest logits of each row (B, V), set the rest to -inf; k None/0/>=V: unchanged."""
    if not k or k >= logits.shape[-1]:
        return logits
    idx = mx.argpartition(-logits, k - 1, axis=-1)[:, :k]  # (B, k): the k largest, in any order
    # scatter rather than `logits < kth value`: a tie at the k-th value must not keep more than k
    keep = mx.put_along_axis(mx.zeros(logits.shape, dtype=mx.bool_), idx, mx.array(True), axis=-1)
    return mx.where(keep, logits, -mx.inf)


def top_p_filter(logits: mx.array, p: float) -> mx.array:
    """Nucleus filter: drop a token when the strictly more likely tokens already hold >= p of the mass."""
    if p >= 1.0:
        return logits
    idx = mx.argsort(-logits, axis=-1)  # (B, V) most likely first
    probs = mx.softmax(mx.take_along_axis(logits, idx, axis=-1), axis=-1)
    before = mx.cumsum(probs, axis=-1) - probs  # 0 for the most likely token, which always stays
    keep = mx.put_along_axis(mx.zeros(logits.shape, dtype=mx.bool_), idx, before < p, axis=-1)
    return mx.where(keep, logits, -mx.inf)


def sample_next(logits: mx.array, params: SamplingParams, key: mx.array | None = None) -> mx.array:
    """Next token ids (B,) from logits (B, V); greedy params take the argmax."""
    if params.greedy:
        return mx.argmax(logits, axis=-1)
    scaled = logits.astype(mx.float32) / params.temperature
    filtered = top_p_filter(top_k_filter(scaled, params.top_k), params.top_p)
    return mx.random.categorical(filtered, axis=-1, key=key)


def decode_steps(
    model: NanoGPTLMHeadModel,
    prompt_ids: Sequence[int],
    params: SamplingParams = SamplingParams(),
    *,
    crop: bool = False,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logits (V,) float32) for up to `params.max_tokens` new tokens; EOT is ordinary here.

    The prompt is checked now (UserError at the call). Puts the model in eval mode (dropout off).
    seed None draws a fresh random seed (like torch's `Generator.seed()`).
    """
    ids = prepare_prompt(prompt_ids, model.config.context_length, crop)
    key = mx.random.key(secrets.randbits(63) if params.seed is None else params.seed)
    model.eval()
    return _decode(model, ids, params, key)


def _decode(
    model: NanoGPTLMHeadModel, ids: list[int], params: SamplingParams, key: mx.array
) -> Iterator[tuple[int, mx.array]]:
    context_length = model.config.context_length
    keep = max(1, context_length // 2)  # tokens re-prefilled when the window slides
    cache = KVCache.for_model(model.config, batch_size=1)

    def forward(new: list[int]) -> mx.array:
        """Feed `new` after what the cache holds; logits (V,) float32 of the last position."""
        return model(mx.array([new], dtype=mx.int32), cache=cache)[0, -1].astype(mx.float32)

    if params.max_tokens == 0:
        return
    history = list(ids)
    logits = forward(history)  # prefill: the prompt goes through the model once
    for step in range(params.max_tokens):
        key, sub = mx.random.split(key)
        token = int(sample_next(logits[None], params, sub).item())  # type: ignore[arg-type]  # an id: int
        yield token, logits
        if step == params.max_tokens - 1:
            return  # no forward pass for a token nobody will ask for
        history.append(token)
        if cache.pos == context_length:  # full: slide the window
            cache.reset()
            logits = forward(history[-keep:])
        else:
            logits = forward([token])


def generate(
    model: NanoGPTLMHeadModel,
    prompt_ids: Sequence[int],
    params: SamplingParams = SamplingParams(),
    *,
    stop_at_eot: bool = True,
    crop: bool = False,
) -> Iterator[int]:
    """Yield new token ids one at a time; with stop_at_eot, `<|endoftext|>` ends the stream unyielded."""
    return tokens_until(decode_steps(model, prompt_ids, params, crop=crop), EOT_ID if stop_at_eot else None)
