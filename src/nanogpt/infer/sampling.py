"""How the next token is chosen: `SamplingParams`, the one description of a sampling request, and the math.

`SamplingParams` is shared by every place that samples: `nanogpt sample` builds one from its flags, the
server from the OpenAI request fields, the MLX sampler reads the same fields, and the sequence-level
distillation teacher turns one into the request it sends (`openai_fields`). Its defaults are the CLI's
(temperature 0.8, top-k 50, 100 new tokens); it is checked when made, so a bad value fails before any
model work.

The policy, as one pure function on a (B, V) batch of logits (`sample_next`): temperature 0 is greedy
(argmax, an explicit mode, not a limit); otherwise logits / temperature, then top-k, then top-p (nucleus)
on what is left (`candidates`), then one draw from a seeded `torch.Generator`, so the same seed gives the
same text.

    params = SamplingParams(temperature=0.8, top_k=50, seed=1337, max_tokens=100)
    token = sample_next(logits, params, make_generator(params.seed))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nanogpt.errors import SettingError, UserError

NEG_INF = float("-inf")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a uint64 (and MLX's random.key too)


@dataclass(frozen=True)
class SamplingParams:
    """One sampling request: how many tokens, how random, and where the text stops.

    top_k None or 0 keeps every token; top_p 1 disables the nucleus filter; seed None draws a fresh one.
    `stop` strings end the text (before the stop); they act on text, so whoever turns tokens into text
    applies them (the server); the token generators only count `max_tokens`. `logit_bias` (token id, bias)
    pairs and the OpenAI penalties change the logits before temperature (`adjust_logits`): a token seen n
    times in the new text loses n * frequency_penalty + presence_penalty.
    """

    max_tokens: int = 100
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        """Refuse settings that mean nothing (nan and inf included), with a one-line fix.

        A `SettingError` names the field; a command adds the flag that set it (`commands/sample.py`).
        """
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SettingError(
                "temperature", f"temperature={self.temperature} must be a finite number >= 0 (0 means greedy)"
            )
        if self.top_k is not None and self.top_k < 0:
            raise SettingError("top_k", f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:  # nan fails every comparison, so it lands here too
            raise SettingError("top_p", f"top_p={self.top_p} must be in (0, 1] (1 disables it)")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise SettingError("seed", f"seed={self.seed} must be in 0..2**64-1")
        if self.max_tokens < 0:
            raise SettingError("max_tokens", f"max_tokens={self.max_tokens} must be >= 0")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise UserError("every stop string must be non-empty text")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise UserError(f"{name}={value} must be in [-2, 2] (0 disables it)")
        for token, bias in self.logit_bias:
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise UserError(f"logit_bias {token}: {bias} needs a token id >= 0 and a bias in [-100, 100]")

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def openai_fields(self) -> dict[str, Any]:
        """These settings as OpenAI request fields (`top_k` is the vLLM/nanogpt extension).

        A setting at its neutral value (no top-k, top-p 1, no seed, no stop) is left out, as a client
        would: the request is the same whichever server reads it, and so is its cache key.
        """
        fields: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.top_p < 1.0:
            fields["top_p"] = self.top_p
        if self.top_k:
            fields["top_k"] = self.top_k
        if self.seed is not None:
            fields["seed"] = self.seed
        if self.stop:
            fields["stop"] = list(self.stop)
        if self.logit_bias:
            fields["logit_bias"] = {str(t): b for t, b in self.logit_bias}
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                fields[name] = getattr(self, name)
        return fields


# ---------------------------------------------------------------------------------------------------
# Sampling math: pure functions on logits (B, V)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidates:
    """The tokens sampling may still pick, per row: logits (B, K) with -inf where top-p removed one."""

    logits: torch.Tensor  # (B, K)
    ids: torch.Tensor  # (B, K) int64: the token id of each logit

    def kept(self, row: int = 0) -> set[int]:
        return set(self.ids[row][self.logits[row] > NEG_INF].tolist())


def top_p_filter(logits: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Nucleus filter on (B, K) logits: keep the smallest set of most likely tokens whose mass reaches p.

    A token is dropped when the tokens more likely than it already hold at least p of the mass, so the
    most likely token always stays. p >= 1 leaves the logits unchanged; a (B, 1) tensor gives each row its p.
    """
    if not isinstance(p, torch.Tensor) and p >= 1.0:
        return logits
    sorted_logits, idx = logits.sort(dim=-1, descending=True)  # (B, K) each
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens; 0 for the first
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)  # back to the input order
    return logits.masked_fill(drop, NEG_INF)


def candidates(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | torch.Tensor = 1.0
) -> Candidates:
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


def adjust_logits(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None) -> torch.Tensor:
    """Logits (B, V) with `params.logit_bias` added and the penalties applied; `counts` (B, V) are how
    often each token appeared in the new text so far (None: nothing generated yet). Unchanged when unused."""
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], device=logits.device)
        bias = torch.tensor([b for _, b in params.logit_bias], device=logits.device, dtype=logits.dtype)
        logits = logits.index_add(-1, ids, bias.expand(logits.size(0), -1))
    if params.penalised and counts is not None:
        logits = logits - counts * params.frequency_penalty - (counts > 0) * params.presence_penalty
    return logits


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V).

    Greedy params: argmax (top_k/top_p are irrelevant). Otherwise softmax(logits / T) restricted to
    `candidates(top_k, top_p)` is sampled once per row with `generator` (on the logits' device, or the
    default RNG when None).
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    c = candidates(logits.float() / params.temperature, params.top_k, params.top_p)
    choice = torch.multinomial(c.logits.softmax(dim=-1), 1, generator=generator)  # (B, 1) index into K
    return c.ids.gather(-1, choice).squeeze(-1)


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    counts: Sequence[torch.Tensor | None],
) -> list[int]:
    """The next token of each row of logits (B, V), row b with its own settings, generator and token counts.

    Row b gets what `sample_next(adjust_logits(logits[b:b+1], ...), params[b], generators[b])` gives it
    alone, so a seeded stream draws the same tokens however crowded the batch is: rows are grouped by their
    top-k (the same candidate shapes as alone), filtered together with per-row temperature and top-p, and
    each draw uses the row's own generator.
    """
    adjusted = [b for b, p in enumerate(params) if p.logit_bias or (p.penalised and counts[b] is not None)]
    if adjusted:
        logits = logits.clone()
        for b in adjusted:
            logits[b] = adjust_logits(logits[b : b + 1], params[b], counts[b])[0]
    out = logits.argmax(dim=-1).tolist()  # the greedy rows' answer
    groups: dict[int | None, list[int]] = {}
    for b, p in enumerate(params):
        if not p.greedy:
            groups.setdefault(p.top_k or None, []).append(b)
    for k, rows in groups.items():
        at = torch.tensor(rows, device=logits.device)
        temperature = torch.tensor([[params[b].temperature] for b in rows], device=logits.device)
        # p = 1 must leave a row unfiltered, as alone: a cumulative sum may round past 1 before its end
        ps = [params[b].top_p if params[b].top_p < 1.0 else 2.0 for b in rows]
        top_p = torch.tensor([[p] for p in ps], device=logits.device) if min(ps) < 1.0 else 1.0
        c = candidates(logits[at].float() / temperature, k, top_p)
        probs = c.logits.softmax(dim=-1)
        for i, b in enumerate(rows):
            choice = torch.multinomial(probs[i : i + 1], 1, generator=generators[b])  # (1, 1)
            out[b] = int(c.ids[i, choice])
    return out


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed` (a fresh random seed when None)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
