"""What `nanogpt serve` accepts: one OpenAI request body, checked field by field, as pure functions.

`parse_request` reads a whole /v1/completions or /v1/chat/completions body into a `CompletionRequest`:
the prompts as token ids, the shared `SamplingParams` (with OpenAI's defaults, not the CLI's), and what
to return. Each field is on an explicit allow-list per endpoint (`COMPLETIONS_FIELDS`, `CHAT_FIELDS`);
a field this server cannot honour is refused, never silently ignored, except the metadata-only fields of
`IGNORED_FIELDS`, which do not change the output. Every refusal is a `BadRequest` whose `param` names the
field, so the 400 body can name it as OpenAI does.

    req = parse_request({"prompt": "Hello", "max_tokens": 5, "n": 2}, tok, chat=False, vocab_size=50257)
    req.sampling_for(1)  # choice 1 of each prompt samples with seed + 1
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from nanogpt.data.chat import prompt_ids
from nanogpt.data.tokenizer import EOT_ID, Tokenizer
from nanogpt.errors import UserError
from nanogpt.infer.sampling import MAX_SEED, SamplingParams

MAX_LOGPROBS = (
    100  # completions' `logprobs: k`; vLLM's default cap is 20, distillation teachers may want more
)
MAX_CHAT_LOGPROBS = 20  # chat's `top_logprobs`, as OpenAI documents it
MAX_N = 16  # choices per prompt
MAX_TOKENS = 1_000_000
DEFAULT_MAX_TOKENS = 16  # /v1/completions, as OpenAI
DEFAULT_CHAT_MAX_TOKENS = 256  # /v1/chat/completions (OpenAI's is the model's whole context)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

N = TypeVar("N", int, float)  # what `read_number` reads a field as
D = TypeVar("D")  # its default when the field is absent or null


class BadRequest(Exception):
    """A malformed or unsupported request: answered 400 with this message.

    `param` is the field at fault (None when it is the body as a whole), `code` a machine-readable reason
    where OpenAI has one (e.g. "context_length_exceeded").
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


# --- the allow-lists -------------------------------------------------------------------------------------------

# Read and honoured on both endpoints (top_k, repetition_penalty and return_tokens_as_token_ids are vLLM's
# extensions; repetition_penalty only at its neutral value 1).
SHARED_FIELDS = frozenset(
    {
        "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "logit_bias",
        "presence_penalty", "frequency_penalty", "repetition_penalty", "n", "stream", "stream_options",
        "return_tokens_as_token_ids",
    }
)  # fmt: skip

# Accepted and ignored: metadata that does not change a single output token, so honouring it is a no-op.
#   user, safety_identifier: who the end user is (abuse monitoring);  metadata: tags for stored completions;
#   service_tier: which capacity pool bills the request;  prompt_cache_key: a hint for a prompt cache;
#   parallel_tool_calls: how tools may be called, and no tools are ever called here.
# `store` belongs here too but only when false (true asks the server to keep the completion, which this
# one cannot): it is in NEUTRAL_ONLY, checked like the fields below.
IGNORED_FIELDS = frozenset(
    {"user", "safety_identifier", "metadata", "service_tier", "prompt_cache_key", "parallel_tool_calls"}
)

# Fields that would change the output and that this server cannot honour: accepted only at the value that
# changes nothing (absent or null always is), refused with "'X' is not supported by this server" otherwise.
# name -> (is the value neutral?, the neutral value besides null, if any), per endpoint.
_NEUTRAL_COMMON: dict[str, tuple[Any, str | None]] = {
    "store": (lambda v: v is False, "false"),
}
_NEUTRAL_COMPLETIONS: dict[str, tuple[Any, str | None]] = {
    "best_of": (lambda v: v == 1 and not isinstance(v, bool), "1"),
    "suffix": (lambda v: v == "", "an empty string"),
}
_NEUTRAL_CHAT: dict[str, tuple[Any, str | None]] = {
    "echo": (lambda v: v is False, "false"),  # vLLM's chat echo; with logprobs it would score the prompt
    "tools": (lambda v: v == [], "an empty list"),
    "functions": (lambda v: v == [], "an empty list"),
    "tool_choice": (lambda v: v in ("none", "auto"), '"none" (no tools)'),
    "function_call": (lambda v: v in ("none", "auto"), '"none" (no functions)'),
    "response_format": (lambda v: v == {"type": "text"}, '{"type": "text"}'),
    "modalities": (lambda v: v == ["text"], '["text"]'),
    "reasoning_effort": (lambda v: False, None),
    "verbosity": (lambda v: False, None),
    "prediction": (lambda v: False, None),
    "audio": (lambda v: False, None),
    "web_search_options": (lambda v: False, None),
}
NEUTRAL_ONLY = {
    False: {**_NEUTRAL_COMMON, **_NEUTRAL_COMPLETIONS},
    True: {**_NEUTRAL_COMMON, **_NEUTRAL_CHAT},
}

COMPLETIONS_FIELDS = SHARED_FIELDS | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = SHARED_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}

# keys a chat message may carry; `name` is allowed and not rendered by the template
MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_call_id", "tool_calls"})


def allowed_fields(chat: bool) -> frozenset[str]:
    """Every top-level field the endpoint accepts (read, ignored, or accepted at its neutral value only)."""
    return (CHAT_FIELDS if chat else COMPLETIONS_FIELDS) | IGNORED_FIELDS | frozenset(NEUTRAL_ONLY[chat])


# --- the request -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionRequest:
    """One checked /v1/completions or /v1/chat/completions request."""

    chat: bool
    prompts: list[list[int]]  # token ids per prompt (chat: exactly one, from the chat template)
    sampling: SamplingParams  # every field explicit, OpenAI's defaults
    n: int  # choices per prompt, 1..MAX_N
    logprobs: int | None  # top alternatives per token (0: the chosen token's logprob only); None: no logprobs
    echo: bool  # completions only: the prompt is returned before the completion
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    token_ids: bool  # return_tokens_as_token_ids (vLLM): tokens written "token_id:N"
    model: str | None  # as sent; the app compares it with the served name

    def sampling_for(self, choice: int) -> SamplingParams:
        """The sampling of choice `choice` (0..n-1) of a prompt: seed, seed+1, ... (or no seed for each)."""
        if self.sampling.seed is None or choice == 0:
            return self.sampling
        return replace(self.sampling, seed=(self.sampling.seed + choice) % (MAX_SEED + 1))


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; anything else (not JSON, not UTF-8, too deep) is a BadRequest."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    except (ValueError, RecursionError):  # an integer of over 4,300 digits; nesting deeper than the stack
        raise BadRequest("the request body holds a number too long or nesting too deep to read") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def parse_request(body: dict[str, Any], tok: Tokenizer, *, chat: bool, vocab_size: int) -> CompletionRequest:
    """`body` checked against the endpoint's allow-list and read; the first fault raises `BadRequest`.

    `vocab_size` bounds the token ids of `logit_bias` (prompt ids are bounded by the tokenizer).
    """
    _check_fields(body, chat)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {model!r}", "model")
    if chat:
        prompts = [chat_prompt(body.get("messages"))]
        max_tokens = read_number(body, "max_tokens", DEFAULT_CHAT_MAX_TOKENS, int, 0, MAX_TOKENS)
        # the newer name wins; both are checked
        max_tokens = read_number(body, "max_completion_tokens", max_tokens, int, 0, MAX_TOKENS)
        top = read_number(body, "top_logprobs", None, int, 0, MAX_CHAT_LOGPROBS)
        wants = read_flag(body, "logprobs")
        if top is not None and not wants:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (top or 0) if wants else None
        echo = False
    else:
        if body.get("prompt") is None:
            raise BadRequest("'prompt' is required", "prompt")
        prompts = parse_prompts(body["prompt"], tok)
        max_tokens = read_number(body, "max_tokens", DEFAULT_MAX_TOKENS, int, 0, MAX_TOKENS)
        logprobs = read_number(body, "logprobs", None, int, 0, MAX_LOGPROBS)
        echo = read_flag(body, "echo")
    if read_number(body, "repetition_penalty", 1.0, float, 1e-9, None) != 1.0:
        raise BadRequest(
            "'repetition_penalty' is not supported by this server; leave it 1 or unset "
            "(presence_penalty and frequency_penalty are)",
            "repetition_penalty",
        )
    top_k = read_number(body, "top_k", None, int, -1, None)
    try:
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=read_number(body, "temperature", 1.0, float, 0.0, 100.0),
            top_k=None if top_k in (None, -1, 0) else top_k,
            top_p=read_number(body, "top_p", 1.0, float, 1e-9, 1.0),
            seed=read_number(body, "seed", None, int, 0, MAX_SEED),
            stop=_stop(body),
            logit_bias=_logit_bias(body, vocab_size),
            presence_penalty=read_number(body, "presence_penalty", 0.0, float, -2.0, 2.0),
            frequency_penalty=read_number(body, "frequency_penalty", 0.0, float, -2.0, 2.0),
        )
    except UserError as e:  # every field was checked above; this is the last word on their combination
        raise BadRequest(str(e)) from None
    stream = read_flag(body, "stream")
    return CompletionRequest(
        chat=chat,
        prompts=prompts,
        sampling=sampling,
        n=read_number(body, "n", 1, int, 1, MAX_N),
        logprobs=logprobs,
        echo=echo,
        stream=stream,
        include_usage=_stream_options(body, stream),
        token_ids=read_flag(body, "return_tokens_as_token_ids"),
        model=model,
    )


def check_context(req: CompletionRequest, context_length: int, param: str | None = None) -> None:
    """Refuse a prompt longer than the model's context (code "context_length_exceeded").

    Only the prompt is refused here: generation stops at the end of the context (finish_reason "length",
    as OpenAI's API does), so a prompt of the whole context still gets its one next token. Scoring alone
    (max_tokens 0) reads len(prompt) - 1 positions, so it takes one token more. `param` names the field
    that held the prompt (default: "messages" or "prompt").
    """
    limit = context_length + 1 if req.sampling.max_tokens == 0 else context_length
    for ids in req.prompts:
        if len(ids) > limit:
            more = " (scoring with max_tokens 0 takes one more)" if req.sampling.max_tokens == 0 else ""
            raise BadRequest(
                f"prompt is {len(ids)} tokens, the model's context is {context_length}{more}",
                param or ("messages" if req.chat else "prompt"),
                "context_length_exceeded",
            )


def check_queue(req: CompletionRequest, max_queue: int) -> None:
    """Refuse a request of more choices than the server's whole queue holds: it could never be queued, so
    a 429 (come back later) would mislead; the server takes a request's choices all at once or not at all."""
    jobs = len(req.prompts) * req.n
    if jobs <= max_queue:
        return
    fix = "restart the server with a larger --max-queue"
    if len(req.prompts) == 1:
        raise BadRequest(
            f"'n'={req.n} exceeds this server's queue of {max_queue} requests (--max-queue), so it can never "
            f"be queued; lower n or {fix}",
            "n",
        )
    raise BadRequest(
        f"{len(req.prompts)} prompts x 'n'={req.n} = {jobs} choices exceed this server's queue of {max_queue} "
        f"requests (--max-queue), so they can never be queued; send fewer prompts or a lower n, or {fix}",
        "n" if req.n > 1 else "prompt",
    )


# --- fields ---------------------------------------------------------------------------------------------------


def _check_fields(body: dict[str, Any], chat: bool) -> None:
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    check_fields(body, allowed_fields(chat), NEUTRAL_ONLY[chat], endpoint)


def check_fields(
    body: dict[str, Any],
    allowed: frozenset[str],
    neutral_only: dict[str, tuple[Any, str | None]],
    endpoint: str,
) -> None:
    """Refuse a field not in `allowed`, a `neutral_only` one at a value that would change the output, and an
    ignored metadata field of the wrong type; `endpoint` is named in the message."""
    for name in sorted(body):  # sorted: the same body always names the same field
        if name not in allowed:
            raise BadRequest(
                f"'{name}' is not supported by this server (not a field of {endpoint} it knows)", name
            )
    for name in sorted(body):
        value = body[name]
        if value is None:
            continue
        if name in neutral_only:
            neutral, what = neutral_only[name]
            if not neutral(value):
                also = f" or {what}" if what else ""
                raise BadRequest(f"'{name}' is not supported by this server; leave it unset{also}", name)
        elif name in ("user", "safety_identifier", "service_tier", "prompt_cache_key"):
            if not isinstance(value, str):
                raise BadRequest(f"'{name}' must be a string, got {value!r}", name)
        elif name == "metadata" and not isinstance(value, dict):
            raise BadRequest(f"'metadata' must be an object, got {value!r}", name)
        elif name == "parallel_tool_calls":
            read_flag(body, name)


def read_number(
    body: dict[str, Any],
    name: str,
    default: D,
    kind: type[N],
    lo: float | None = None,
    hi: float | None = None,
    param: str | None = None,
) -> N | D:
    """body[name] as a finite int or float in [lo, hi]; null or absent is `default`.

    Python's json module reads NaN and Infinity, which no comparison refuses: they are refused here, by name.
    A float that is an integer (2.0) is read as one; 1.5 is not an integer.
    """
    param = param or name
    v = body.get(name, default)
    if v is None:
        return default
    what = "an integer" if kind is int else "a finite number"
    bad_float = isinstance(v, float) and not (math.isfinite(v) and (kind is float or v.is_integer()))
    if isinstance(v, bool) or not isinstance(v, (int, float)) or bad_float:
        raise BadRequest(f"'{param}' must be {what}, got {v!r}", param)
    span = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
    # no field takes a 65-bit integer, and float() of a huge one would overflow
    if (
        (isinstance(v, int) and v.bit_length() > 64)
        or (lo is not None and v < lo)
        or (hi is not None and v > hi)
    ):
        shown = v if abs(v) < 10**30 else f"an integer of {int(v).bit_length()} bits"
        raise BadRequest(f"'{param}'={shown} is out of range: it must be {span}", param)
    return kind(v)


def read_flag(body: dict[str, Any], name: str, param: str | None = None) -> bool:
    """body[name] as a JSON boolean (absent or null: false); the string "false" is not false."""
    param = param or name
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise BadRequest(f"'{param}' must be true or false, got {v!r}", param)
    return v


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a string or a list of non-empty strings", "stop")
    return tuple(stop)


def _logit_bias(body: dict[str, Any], vocab_size: int) -> tuple[tuple[int, float], ...]:
    """{"token id": bias} as (id, bias) pairs; ids in [0, vocab_size), biases in [-100, 100]."""
    v = body.get("logit_bias")
    if v is None:
        return ()
    if not isinstance(v, dict):
        raise BadRequest(f"'logit_bias' must be an object {{\"token id\": bias}}, got {v!r}", "logit_bias")
    pairs = []
    for key, bias in v.items():
        # JSON keys are strings; a decimal integer one, short enough for int() to read
        if not (re.fullmatch(r"[0-9]{1,20}", key) and int(key) < vocab_size):
            raise BadRequest(
                f"'logit_bias' key {key!r} is not a token id: ids are integers in [0, {vocab_size})",
                "logit_bias",
            )
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            # nan fails both comparisons, so it lands here too
            raise BadRequest(
                f"'logit_bias' value {bias!r} for token {key} must be a number in [-100, 100]", "logit_bias"
            )
        pairs.append((int(key), float(bias)))
    return tuple(pairs)


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    """stream_options.include_usage; stream_options without stream=true is refused, as OpenAI does."""
    so = body.get("stream_options")
    if so is None:
        return False
    if not stream:
        raise BadRequest("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if not isinstance(so, dict):
        raise BadRequest(f"'stream_options' must be an object, got {so!r}", "stream_options")
    for key in sorted(so):
        if key not in ("include_usage", "include_obfuscation"):  # obfuscation pads chunks: nothing to pad
            raise BadRequest(
                f"'stream_options.{key}' is not supported by this server", f"stream_options.{key}"
            )
    read_flag(so, "include_obfuscation", "stream_options.include_obfuscation")
    return read_flag(so, "include_usage", "stream_options.include_usage")


# --- prompts ---------------------------------------------------------------------------------------------------


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
    raise BadRequest(
        "'prompt' must be a string, a list of token ids, or a non-empty list of either", "prompt"
    )


def _check_ids(ids: list[int], tok: Tokenizer) -> list[int]:
    if any(t < 0 or t >= tok.vocab_size for t in ids):
        raise BadRequest(f"prompt token ids must be in [0, {tok.vocab_size})", "prompt")
    return ids


def message_role(
    m: dict[str, Any], where: str, roles: tuple[str, ...], keys: frozenset[str] = MESSAGE_KEYS
) -> str:
    """A message's role, after checking that it holds only `keys` (those this server reads) and a role of
    `roles`; the Responses API's input items pass their own keys."""
    for key in sorted(m):
        if key not in keys:
            raise BadRequest(f"'{where}.{key}' is not supported by this server", f"{where}.{key}")
    role = m.get("role")
    if role not in roles:
        raise BadRequest(f"'{where}.role' must be one of {', '.join(roles)}; got {role!r}", f"{where}.role")
    return str(role)


def chat_prompt(messages: Any) -> list[int]:
    """The prompt ids of `messages` in the one chat template (`nanogpt.data.chat`, what fine-tuning trains
    on), ending with "Assistant:" for the reply.

    `content` is a string or a list of text parts (joined by newlines, as vLLM does); `name` is allowed
    and not rendered; a "developer" message is the system message (OpenAI's newer name). Any other part
    (image_url, input_audio, file, ...) is refused, by its place. "<|endoftext|>" typed in a message stays
    text: only the template ends a turn.
    """
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    turns = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"'{where}' must be an object with 'role' and 'content'", where)
        role = message_role(m, where, CHAT_ROLES)
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise BadRequest(f"'{where}.{key}' must be a string", f"{where}.{key}")
        if m.get("tool_calls") not in (None, []):
            raise BadRequest(f"'{where}.tool_calls' is not supported by this server", f"{where}.tool_calls")
        text = _message_text(m.get("content"), where, role)
        turns.append({"role": "system" if role == "developer" else role, "content": text})
    return prompt_ids(turns)


def _message_text(content: Any, where: str, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":  # an assistant turn that only called tools
        return ""
    if not isinstance(content, list):
        raise BadRequest(f"'{where}.content' must be a string or a list of text parts", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            shown = f"a {kind!r} part" if isinstance(kind, str) else "not a {type, text} object"
            raise BadRequest(f"'{at}' is {shown}; this server takes text parts only", at)
        if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise BadRequest(f'\'{at}\' must be {{"type": "text", "text": string}}', at)
        texts.append(part["text"])
    return "\n".join(texts)
