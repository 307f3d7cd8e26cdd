"""Text generation: the sampling math, a KV-cached token generator, and text streamed as tokens arrive.

- `sample_next` is the whole sampling policy as one pure function on a (B, V) batch of logits:
  temperature 0 is greedy (argmax, an explicit mode, not a limit); otherwise logits / temperature,
  then top-k, then top-p (nucleus) on what is left (`candidates`), then one draw from a seeded
  `torch.Generator`, so the same seed gives the same text.
- `decode_steps` is a Python generator: it prefills the prompt into the preallocated `KVCache` once,
  then feeds one token per step (never the whole sequence again) and yields (token, logits).
  `generate` is the same stream as plain token ids, ending at `<|endoftext|>`.
- The context is finite and the position embeddings are learned and absolute, so cached keys cannot
  be shifted left. A prompt longer than the context is refused unless `crop=True` keeps its last
  `context_length` tokens. When the cache is full, generation slides the window: the last
  `context_length // 2` tokens are re-prefilled into the (reset) cache at positions 0.. and decoding
  goes on. That costs one prefill of C/2 tokens every C/2 new tokens, instead of nanoGPT's full
  re-run of the last C tokens at every step, and each new token still sees at least C/2 tokens.
- Each model call runs under `torch.inference_mode()` and the optional autocast inside the generator
  body only, so neither mode leaks into the caller's code between two yields.

    ids = list(generate(model, tok.encode("Once upon a time"), 100, temperature=0.8, top_k=50, seed=1337))
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nanogpt.data.tokenizer import EOT_ID, Tokenizer
from nanogpt.errors import UserError
from nanogpt.kernels.decode import decode_step, prepare_decode_weights
from nanogpt.kernels.device import autocast, torch_dtype
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.model.kv_cache import KVCache

NEG_INF = float("-inf")

# ---------------------------------------------------------------------------------------------------
# Sampling math: pure functions on logits (B, V)
# ---------------------------------------------------------------------------------------------------


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a uint64 (and MLX's random.key too)


def check_sampling(temperature: float, top_k: int | None, top_p: float, seed: int | None = None) -> None:
    """Refuse sampling settings that mean nothing (nan and inf included), with a one-line fix."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(
            f"temperature={temperature} must be a finite number >= 0 (0 means greedy); e.g. --temperature 0.8"
        )
    if top_k is not None and top_k < 0:
        raise UserError(f"top_k={top_k} must be >= 0 (0 disables it); e.g. --top-k 50")
    if not 0.0 < top_p <= 1.0:  # nan fails every comparison, so it lands here too
        raise UserError(f"top_p={top_p} must be in (0, 1] (1 disables it); e.g. --top-p 0.9")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UserError(f"seed={seed} must be in 0..2**64-1; e.g. --seed 1337")


@dataclass(frozen=True)
class Candidates:
    """The tokens sampling may still pick, per row: logits (B, K) with -inf where top-p removed one."""

    logits: torch.Tensor  # (B, K)
    ids: torch.Tensor  # (B, K) int64: the token id of each logit

    def kept(self, row: int = 0) -> set[int]:
        return set(self.ids[row][self.logits[row] > NEG_INF].tolist())


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter on (B, K) logits: keep the smallest set of most likely tokens whose mass reaches p.

    A token is dropped when the tokens more likely than it already hold at least p of the mass, so the
    most likely token always stays. p >= 1 leaves the logits unchanged.
    """
    if p >= 1.0:
        return logits
    sorted_logits, idx = logits.sort(dim=-1, descending=True)  # (B, K) each
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens; 0 for the first
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)  # back to the input order
    return logits.masked_fill(drop, NEG_INF)


def candidates(logits: torch.Tensor, top_k: int | None = None, top_p: float = 1.0) -> Candidates:
    """Top-k, then top-p on what is left, from (B, V) logits.

    top_k keeps exactly k tokens (ties broken by torch.topk); None or 0 (or k >= V) disables it.
    Working on the k survivors rather than masking all V logits keeps the softmax, the nucleus sort
    and the draw small: with V = 50,257 that is most of the sampling cost.
    """
    V = logits.size(-1)
    if top_k and top_k < V:
        values, ids = torch.topk(logits, top_k, dim=-1)  # (B, k), most likely first
    else:
        values = logits
        ids = torch.arange(V, device=logits.device).expand_as(logits)  # (B, V)
    return Candidates(top_p_filter(values, top_p), ids)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V).

    temperature == 0: greedy argmax (top_k/top_p are irrelevant). Otherwise softmax(logits / T)
    restricted to `candidates(top_k, top_p)` is sampled once per row with `generator` (on the logits'
    device, or the default RNG when None).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    c = candidates(logits.float() / temperature, top_k, top_p)
    choice = torch.multinomial(c.logits.softmax(dim=-1), 1, generator=generator)  # (B, 1) index into K
    return c.ids.gather(-1, choice).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed` (a fresh random seed when None)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


# ---------------------------------------------------------------------------------------------------
# Token generation with the KV cache
# ---------------------------------------------------------------------------------------------------


def prepare_prompt(prompt_ids: Sequence[int], context_length: int, crop: bool = False) -> list[int]:
    """The prompt the model will see: refused if empty, or if longer than the context without crop."""
    ids = list(prompt_ids)
    if not ids:
        raise UserError("the prompt is empty; pass at least one token (the CLI starts from <|endoftext|>)")
    if len(ids) > context_length:
        if not crop:
            raise UserError(
                f"prompt is {len(ids)} tokens, the context is {context_length}; "
                f"shorten it or pass --crop to keep the last {context_length} tokens"
            )
        ids = ids[-context_length:]
    return ids


def decode_steps(
    model: NanoGPTLMHeadModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    crop: bool = False,
    dtype: str = "fp32",
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token, logits) for up to `max_new_tokens` new tokens; EOT is an ordinary token here.

    `logits` (V,) float32 are the raw logits the token was drawn from (before temperature and filters).
    Arguments are checked now, so bad input raises `UserError` at the call, not at the first `next()`.
    Puts the model in eval mode (dropout off); a training loop that samples must call `.train()` again.
    """
    check_sampling(temperature, top_k, top_p, seed)
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    torch_dtype(dtype)  # refuse an unknown dtype now
    ids = prepare_prompt(prompt_ids, model.config.context_length, crop)
    device = next(model.parameters()).device
    if generator is None and temperature > 0:
        generator = make_generator(seed, device)
    model.eval()

    def pick(logits: torch.Tensor) -> int:  # logits (V,) -> the next token
        return int(sample_next(logits[None], temperature, top_k, top_p, generator).item())

    return _decode(model, ids, max_new_tokens, device, dtype, pick)


def _decode(
    model: NanoGPTLMHeadModel,
    ids: list[int],
    max_new_tokens: int,
    device: torch.device,
    dtype: str,
    pick: Callable[[torch.Tensor], int],
) -> Iterator[tuple[int, torch.Tensor]]:
    ctx = model.config.context_length
    keep = max(1, ctx // 2)  # tokens re-prefilled when the window slides
    # under autocast the keys/values come out in the autocast dtype: store them as such
    cache_dtype = next(model.parameters()).dtype if dtype == "fp32" else torch_dtype(dtype)
    with torch.inference_mode():
        cache = KVCache.for_model(model.config, batch_size=1, device=device, dtype=cache_dtype)
    prepared: list[bool] = []  # the decode copies are made after the prefill

    def forward(new: list[int], prefill: bool = False) -> torch.Tensor:
        """Feed `new` after what the cache holds; logits (V,) float32 of the last position."""
        with torch.inference_mode(), autocast(device, dtype):
            if not prefill and not prepared:  # the first token comes without waiting for the copies
                prepare_decode_weights(model, cache_dtype)
                prepared.append(True)
            x = torch.tensor([new], dtype=torch.long, device=device)  # (1, T)
            # the copies are used inside this step only, and only by this thread (see kernels.decode)
            with decode_step(device, cache_dtype, one_row=len(new) == 1, use_copies=not prefill):
                return model(x, cache=cache, last_only=True)[0, -1].float()  # (V,)

    if max_new_tokens == 0:
        return
    history = list(ids)
    logits = forward(history, prefill=True)  # the prompt goes through the model once
    for step in range(max_new_tokens):
        with torch.inference_mode():
            token = pick(logits)
        yield token, logits
        if step == max_new_tokens - 1:
            return  # no forward pass for a token nobody will ask for
        history.append(token)
        if cache.pos == ctx:  # full: slide the window (see the module docstring)
            cache.reset()
            logits = forward(history[-keep:])
        else:
            logits = forward([token])


def generate(
    model: NanoGPTLMHeadModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop_at_eot: bool = True,
    crop: bool = False,
    dtype: str = "fp32",
) -> Iterator[int]:
    """Yield new token ids one at a time, up to `max_new_tokens`.

    With stop_at_eot, generation ends at `<|endoftext|>`, which is not yielded (it ends the text, it is
    not part of it); with stop_at_eot=False it is yielded like any other token. Arguments are checked at
    the call (see `decode_steps`, which documents the rest).
    """
    steps = decode_steps(
        model,
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        generator=generator,
        crop=crop,
        dtype=dtype,
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
