"""What `nanogpt serve` accepts: the OpenAI request fields it reads, checked, as pure functions.

Each malformed field raises `BadRequest` with a message that names it; the server answers 400 with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from nanogpt.data.tokenizer import EOT_ID, Tokenizer
from nanogpt.errors import UserError
from nanogpt.infer.sampling import MAX_SEED, SamplingParams

MAX_LOGPROBS = 100  # vLLM's default cap is 20; teachers may want more


class BadRequest(Exception):
    """A malformed request: answered 400 with this message."""


@dataclass(frozen=True)
class RequestOptions:
    """What a completion request asks for: the shared sampling settings, then what to return and how."""

    sampling: SamplingParams
    logprobs: int | None
    echo: bool
    stream: bool
    token_ids: bool  # return_tokens_as_token_ids


def _num(
    body: dict[str, Any],
    name: str,
    default: Any,
    kind: type,
    lo: float | None = None,
    hi: float | None = None,
):
    """body[name] as a finite int or float in [lo, hi]; null or absent is `default`.

    Python's json module reads NaN and Infinity, which no comparison refuses: they are refused here, by name.
    """
    v = body.get(name, default)
    if v is None:
        return default
    what = "an integer" if kind is int else "a finite number"
    bad_float = isinstance(v, float) and not (math.isfinite(v) and (kind is float or v.is_integer()))
    if isinstance(v, bool) or not isinstance(v, (int, float)) or bad_float:
        raise BadRequest(f"'{name}' must be {what}, got {v!r}")
    span = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
    # no field takes a 65-bit integer, and float() of a huge one would overflow
    if (
        (isinstance(v, int) and v.bit_length() > 64)
        or (lo is not None and v < lo)
        or (hi is not None and v > hi)
    ):
        shown = v if abs(v) < 10**30 else f"an integer of {int(v).bit_length()} bits"
        raise BadRequest(f"'{name}'={shown} is out of range: it must be {span}")
    return kind(v)


def _flag(body: dict[str, Any], name: str) -> bool:
    """body[name] as a JSON boolean (absent or null: false); the string "false" is not false."""
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise BadRequest(f"'{name}' must be true or false, got {v!r}")
    return v


def _no_penalty(body: dict[str, Any]) -> None:
    """Penalties are checked as OpenAI/vLLM define them; any other than the neutral value is refused.

    This server samples without penalties: answering a request that asked for one as if it had been
    applied would be a silent lie.
    """
    for name in ("presence_penalty", "frequency_penalty"):
        if _num(body, name, 0.0, float, -2.0, 2.0) != 0.0:
            raise BadRequest(f"'{name}' is not supported by this server; leave it 0 or unset")
    if _num(body, "repetition_penalty", 1.0, float, 1e-9, None) != 1.0:
        raise BadRequest("'repetition_penalty' is not supported by this server; leave it 1 or unset")


def parse_options(body: dict[str, Any], default_max_tokens: int = 16) -> RequestOptions:
    """The request's fields, checked, with OpenAI's defaults (temperature 1, no top-k, 16 tokens)."""
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a string or a list of non-empty strings")
    logprobs = body.get("logprobs")
    if logprobs is True:  # the chat API's boolean form, with top_logprobs as the count
        logprobs = _num(body, "top_logprobs", 0, int, 0, MAX_LOGPROBS)
    elif logprobs is False:
        logprobs = None
    elif logprobs is not None:
        logprobs = _num(body, "logprobs", None, int, 0, MAX_LOGPROBS)
    n = _num(body, "n", 1, int, 1, 1)  # one choice per prompt
    del n
    _no_penalty(body)
    top_k = _num(body, "top_k", None, int, -1, None)
    try:
        sampling = SamplingParams(
            max_tokens=_num(body, "max_tokens", default_max_tokens, int, 0, 1_000_000),
            temperature=_num(body, "temperature", 1.0, float, 0.0, 100.0),
            top_p=_num(body, "top_p", 1.0, float, 1e-9, 1.0),
            top_k=None if top_k in (None, -1, 0) else top_k,
            seed=_num(body, "seed", None, int, 0, MAX_SEED),
            stop=tuple(stop),
        )
    except UserError as e:  # every field was checked above; this is the last word on their combination
        raise BadRequest(str(e)) from None
    return RequestOptions(
        sampling=sampling,
        logprobs=logprobs,
        echo=_flag(body, "echo"),
        stream=_flag(body, "stream"),
        token_ids=_flag(body, "return_tokens_as_token_ids"),
    )


def parse_prompts(prompt: Any, tok: Tokenizer) -> list[list[int]]:
    """Token-id prompts from a string, a token-id list, or a list of either (OpenAI's four forms)."""
    if isinstance(prompt, str):
        return [tok.encode(prompt) if prompt else [EOT_ID]]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return [_check_ids(prompt, tok)]
    if isinstance(prompt, list) and prompt:
        return (
            [p for item in prompt for p in parse_prompts(item, tok)]
            if all(isinstance(i, (str, list)) for i in prompt)
            else _bad_prompt()
        )
    return _bad_prompt()


def _bad_prompt() -> list[list[int]]:
    raise BadRequest("'prompt' must be a string, a list of token ids, or a non-empty list of either")


def _check_ids(ids: list[int], tok: Tokenizer) -> list[int]:
    if any(t < 0 or t >= tok.vocab_size for t in ids):
        raise BadRequest(f"prompt token ids must be in [0, {tok.vocab_size})")
    return ids


def chat_prompt(messages: Any) -> str:
    """The base-model chat template: "role: content\\n" per message, then "assistant:"."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
    lines = []
    for m in messages:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise BadRequest("each message must be an object with string 'role' and 'content'")
        lines.append(f"{m['role']}: {m['content']}\n")
    return "".join(lines) + "assistant:"
