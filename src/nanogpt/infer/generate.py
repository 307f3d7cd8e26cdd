"""Text generation: a KV-cached token generator, and text streamed as tokens arrive.

- What to sample is one `SamplingParams` (see `sampling.py`, which also holds the sampling math).
- `decode_steps` is a Python generator: it prefills the prompt into the preallocated `KVCache` once,
  then feeds one token per step (never the whole sequence again) and yields (token, logits).
  `generate` is the same stream as plain token ids, ending at `<|endoftext|>`.
- The context is finite and the position embeddings are learned and absolute, so cached keys cannot
  be shifted left. A prompt longer than the context is refused unless `crop=True` keeps its last
  `context_length` tokens. When the cache is full, generation slides the window: the last
  `context_length // 2` tokens are re-prefilled into the (reset) cache at positions 0.. and decoding
  goes on. That costs one prefill of C/2 tokens every C/2 new tokens, instead of nanoGPT's full
  re-run of the last C tokens at every step, and each new token still sees at least C/2 tokens.
- Each model call goes through a `kernels.Decoder` (the fast decode path: inference mode, the optional
  autocast, the decode weight copies), inside the generator body only, so no mode leaks into the
  caller's code between two yields.

    ids = list(generate(model, tok.encode("Once upon a time"), SamplingParams(max_tokens=100, seed=1337)))
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from nanogpt.data.tokenizer import EOT_ID, Tokenizer
from nanogpt.errors import SettingError, UserError
from nanogpt.infer.sampling import SamplingParams, adjust_logits, make_generator, sample_next
from nanogpt.kernels.decode import Decoder
from nanogpt.kernels.device import torch_dtype
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.model.kv_cache import KVCache

# ---------------------------------------------------------------------------------------------------
# Token generation with the KV cache
# ---------------------------------------------------------------------------------------------------


class PromptTooLong(SettingError):
    """A prompt longer than the context, without `crop`; a command names its own way to crop."""

    def __init__(self, length: int, context_length: int) -> None:
        super().__init__(
            "crop",
            f"prompt is {length} tokens, the context is {context_length}; "
            f"shorten it or crop it to its last {context_length} tokens (crop=True)",
        )
        self.length, self.context_length = length, context_length

    def __reduce__(self) -> tuple[type[PromptTooLong], tuple[int, int]]:
        return type(self), (self.length, self.context_length)


def prepare_prompt(prompt_ids: Sequence[int], context_length: int, crop: bool = False) -> list[int]:
    """The prompt the model will see: refused if empty, or if longer than the context without crop."""
    ids = list(prompt_ids)
    if not ids:
        raise UserError("the prompt is empty; pass at least one token")
    if len(ids) > context_length:
        if not crop:
            raise PromptTooLong(len(ids), context_length)
        ids = ids[-context_length:]
    return ids


def decode_steps(
    model: NanoGPTLMHeadModel,
    prompt_ids: Sequence[int],
    params: SamplingParams = SamplingParams(),
    *,
    generator: torch.Generator | None = None,
    crop: bool = False,
    dtype: str = "fp32",
    compile: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token, logits) for up to `params.max_tokens` new tokens; EOT is an ordinary token here.

    `logits` (V,) float32 are the raw logits the token was drawn from (before temperature and filters).
    Arguments are checked now, so bad input raises `UserError` at the call, not at the first `next()`.
    `generator` (instead of `params.seed`) lets several calls draw from one stream. Puts the model in
    eval mode (dropout off); a training loop that samples must call `.train()` again. `compile` runs
    the one-token steps through `torch.compile` (`Decoder(..., compile=True)`; the first step compiles).
    """
    if params.seed is not None and generator is not None:
        raise ValueError("pass params.seed or generator, not both")
    torch_dtype(dtype)  # refuse an unknown dtype now
    ids = prepare_prompt(prompt_ids, model.config.context_length, crop)
    device = next(model.parameters()).device
    if generator is None and not params.greedy:
        generator = make_generator(params.seed, device)
    model.eval()

    counts = torch.zeros(1, model.config.vocab_size, device=device) if params.penalised else None

    def pick(logits: torch.Tensor) -> int:  # logits (V,) -> the next token
        token = int(sample_next(adjust_logits(logits[None], params, counts), params, generator).item())
        if counts is not None:
            counts[0, token] += 1
        return token

    return _decode(model, ids, params.max_tokens, Decoder(model, dtype, compile=compile), pick)


def _decode(
    model: NanoGPTLMHeadModel,
    ids: list[int],
    max_new_tokens: int,
    decoder: Decoder[KVCache | None],
    pick: Callable[[torch.Tensor], int],
) -> Iterator[tuple[int, torch.Tensor]]:
    ctx = model.config.context_length
    keep = max(1, ctx // 2)  # tokens re-prefilled when the window slides
    device = decoder.device
    with torch.inference_mode():
        cache = KVCache.for_model(model.config, batch_size=1, device=device, dtype=decoder.cache_dtype)

    def feed(new: list[int], prefill: bool) -> torch.Tensor:
        """Feed `new` after what the cache holds; logits (V,) float32 of the last position."""
        x = torch.tensor([new], dtype=torch.long, device=device)  # (1, T)
        logits = decoder.prefill(x, cache) if prefill else decoder.step(x, cache)
        return logits[0, -1].float()  # (V,)

    if max_new_tokens == 0:
        return
    history = list(ids)
    logits = feed(history, prefill=True)  # the prompt goes through the model once
    for step in range(max_new_tokens):
        with torch.inference_mode():
            token = pick(logits)
        yield token, logits
        if step == max_new_tokens - 1:
            return  # no forward pass for a token nobody will ask for
        history.append(token)
        if cache.pos == ctx:  # full: slide the window (see the module docstring)
            cache.reset()
            logits = feed(history[-keep:], prefill=True)
        else:
            logits = feed([token], prefill=False)


def generate(
    model: NanoGPTLMHeadModel,
    prompt_ids: Sequence[int],
    params: SamplingParams = SamplingParams(),
    *,
    generator: torch.Generator | None = None,
    stop_at_eot: bool = True,
    crop: bool = False,
    dtype: str = "fp32",
    compile: bool = False,
) -> Iterator[int]:
    """Yield new token ids one at a time, up to `params.max_tokens`.

    With stop_at_eot, generation ends at `<|endoftext|>`, which is not yielded (it ends the text, it is
    not part of it); with stop_at_eot=False it is yielded like any other token. Arguments are checked at
    the call (see `decode_steps`, which documents the rest).
    """
    steps = decode_steps(
        model, prompt_ids, params, generator=generator, crop=crop, dtype=dtype, compile=compile
    )
    return tokens_until(steps, EOT_ID if stop_at_eot else None)


def tokens_until(steps: Iterable[tuple[int, Any]], stop: int | None) -> Iterator[int]:
    """The tokens of (token, logits) steps, ending (unyielded) at `stop`; any backend's logits."""
    for token, _ in steps:
        if token == stop:
            return
        yield token


# ---------------------------------------------------------------------------------------------------
# Streaming text
# ---------------------------------------------------------------------------------------------------


def stream_text(token_ids: Iterable[int], tok: Tokenizer) -> Iterator[str]:
    """Text pieces as tokens arrive; a character whose UTF-8 bytes span tokens appears once complete.

    A piece may be "" while a character is incomplete; bytes that never form valid UTF-8 become U+FFFD.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for t in token_ids:
        yield decoder.decode(tok.decode_bytes([t]))
    yield decoder.decode(b"", final=True)
