"""`POST /v1/responses`: OpenAI's Responses API on the same engine as chat, for a text answer.

`parse_responses` reads a body into the `CompletionRequest` chat would make of the same messages: `input`
(a string, or a list of messages whose content is a string or `input_text` parts; earlier assistant turns
may carry `output_text` parts) and `instructions` (a system message placed first) become chat messages,
formatted by `requests.chat_prompt`, so a Responses request and a chat request of the same messages read
the same prompt. `max_output_tokens`, `temperature`, `top_p`, `model` and `stream` are read; what this
server cannot honour (tools, stored responses and `previous_response_id`, background runs, reasoning,
structured output, ...) is refused by name, as in `requests.py`.

The answer is OpenAI's response object (`response_object`): status "completed", or "incomplete" with
`incomplete_details.reason` "max_output_tokens" when the token limit (or the end of the model's context)
stopped it; one assistant message with one `output_text` part; the usage. Streamed, it is the documented
event sequence, each event with its `sequence_number`: response.created, response.in_progress,
response.output_item.added, response.content_part.added, response.output_text.delta (per piece of text),
response.output_text.done, response.content_part.done, response.output_item.done, then
response.completed (or response.incomplete, as OpenAI ends an incomplete one); a job that fails after
the stream began ends it with response.failed, whose `error` says why.

    rr = parse_responses({"input": "Hi", "instructions": "Be brief."}, tok, vocab_size=50257)
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nanogpt.data.tokenizer import Tokenizer
from nanogpt.errors import UserError
from nanogpt.infer.sampling import SamplingParams
from nanogpt.serve.choices import Choice, events, failure
from nanogpt.serve.engine import Finished, Handle, Token
from nanogpt.serve.errors import error_response
from nanogpt.serve.requests import (
    DEFAULT_CHAT_MAX_TOKENS,
    IGNORED_FIELDS,
    MAX_TOKENS,
    BadRequest,
    CompletionRequest,
    chat_prompt,
    check_fields,
    message_role,
    read_flag,
    read_number,
)

if TYPE_CHECKING:  # the serve extra is imported where it is used, never at import time
    from starlette.responses import JSONResponse

ENDPOINT = "/v1/responses"
READ_FIELDS = frozenset(
    {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "stream_options"}
)  # fmt: skip

# Refused with the reason, whatever their value (null or absent is always fine): what they ask for needs
# state this server does not keep, or work it does not do.
REFUSED_WITH_REASON = {
    "previous_response_id": "this server keeps no responses to continue from; send the whole conversation "
    "in 'input'",
    "conversation": "this server keeps no conversations; send the whole conversation in 'input'",
    "prompt": "this server keeps no prompt templates; send the text in 'input' and 'instructions'",
}


def _text_neutral(v: Any) -> bool:
    fmt = v.get("format") if isinstance(v, dict) else None
    return (
        isinstance(v, dict)
        and set(v) <= {"format", "verbosity"}
        and fmt in (None, {"type": "text"})
        and v.get("verbosity") is None
    )


# Accepted only at the value that changes nothing, as requests.NEUTRAL_ONLY (absent or null always is).
NEUTRAL_ONLY: dict[str, tuple[Any, str | None]] = {
    "store": (lambda v: v is False, "false: stored responses are not kept"),
    "background": (lambda v: v is False, "false: a response runs while its request is open"),
    "tools": (lambda v: v == [], "an empty list (no tools)"),
    "tool_choice": (lambda v: v in ("none", "auto"), '"none" (no tools)'),
    "max_tool_calls": (lambda v: False, None),
    "include": (lambda v: v == [], "an empty list"),
    "text": (_text_neutral, '{"format": {"type": "text"}}'),
    "truncation": (lambda v: v == "disabled", '"disabled" (a prompt longer than the context is refused)'),
    "reasoning": (lambda v: isinstance(v, dict) and all(x is None for x in v.values()), None),
    "top_logprobs": (lambda v: v == 0, "0"),
    "context_management": (lambda v: False, None),
}

ALLOWED = READ_FIELDS | IGNORED_FIELDS | frozenset(NEUTRAL_ONLY) | frozenset(REFUSED_WITH_REASON)

INPUT_ROLES = ("user", "assistant", "system", "developer")
MESSAGE_KEYS = frozenset({"type", "role", "content", "id", "status", "phase"})


@dataclass(frozen=True)
class ResponsesRequest:
    """One checked /v1/responses request: the chat request it runs as, and what its answer echoes."""

    request: CompletionRequest  # chat=True, n=1: the engine job, exactly as chat would make it
    echo: dict[str, Any]  # the request's settings, as the response object states them

    @property
    def stream(self) -> bool:
        return self.request.stream


def parse_responses(body: dict[str, Any], tok: Tokenizer, *, vocab_size: int) -> ResponsesRequest:
    """`body` checked and read; the first fault raises `BadRequest` naming its field."""
    for name, why in REFUSED_WITH_REASON.items():
        if body.get(name) is not None:
            raise BadRequest(f"'{name}' is not supported by this server: {why}", name)
    check_fields(body, ALLOWED, NEUTRAL_ONLY, ENDPOINT)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {model!r}", "model")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise BadRequest(f"'instructions' must be a string, got {instructions!r}", "instructions")
    prompt = chat_prompt(input_messages(body.get("input"), instructions))
    limit = read_number(body, "max_output_tokens", None, int, 1, MAX_TOKENS)
    try:
        sampling = SamplingParams(
            max_tokens=DEFAULT_CHAT_MAX_TOKENS if limit is None else limit,
            temperature=read_number(body, "temperature", 1.0, float, 0.0, 100.0),
            top_k=None,
            top_p=read_number(body, "top_p", 1.0, float, 1e-9, 1.0),
        )
    except UserError as e:
        raise BadRequest(str(e)) from None
    stream = read_flag(body, "stream")
    _stream_options(body, stream)
    request = CompletionRequest(
        chat=True,
        prompts=[prompt],
        sampling=sampling,
        n=1,
        logprobs=None,
        echo=False,
        stream=stream,
        include_usage=False,
        token_ids=False,
        model=model,
    )
    echo = {
        "instructions": instructions,
        "max_output_tokens": limit,
        "metadata": body.get("metadata") or {},
        "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
        "prompt_cache_key": body.get("prompt_cache_key"),
        "safety_identifier": body.get("safety_identifier"),
        "service_tier": body.get("service_tier") or "default",
        "temperature": sampling.temperature,
        "tool_choice": body.get("tool_choice") or "auto",
        "top_p": sampling.top_p,
        "user": body.get("user"),
    }
    return ResponsesRequest(request, echo)


def _stream_options(body: dict[str, Any], stream: bool) -> None:
    so = body.get("stream_options")
    if so is None:
        return
    if not stream:
        raise BadRequest("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if not isinstance(so, dict) or set(so) - {"include_obfuscation"}:
        raise BadRequest(
            "'stream_options' may only hold include_obfuscation here (nothing to obfuscate)", "stream_options"
        )
    read_flag(so, "include_obfuscation", "stream_options.include_obfuscation")


def input_messages(value: Any, instructions: str | None) -> list[dict[str, Any]]:
    """`input` (and `instructions`, first, as a system message) as the chat messages `chat_prompt` formats."""
    messages: list[dict[str, Any]] = []
    if instructions is not None:
        messages.append({"role": "system", "content": instructions})
    if isinstance(value, str):
        return [*messages, {"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise BadRequest("'input' must be a string or a non-empty list of messages", "input")
    for i, item in enumerate(value):
        messages.append(_input_message(item, f"input[{i}]"))
    return messages


def _input_message(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise BadRequest(f"'{where}' must be a message object with 'role' and 'content'", where)
    kind = item.get("type", "message")
    if kind != "message":
        raise BadRequest(f"'{where}' is a {kind!r} item; this server takes messages only", f"{where}.type")
    role = message_role(item, where, INPUT_ROLES, MESSAGE_KEYS)
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise BadRequest(f"'{where}.content' must be a string or a list of text parts", f"{where}.content")
    # earlier answers come back as output_text parts (with their annotations): text like any other
    kinds = ("input_text", "output_text") if role == "assistant" else ("input_text",)
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds:
            shown = f"a {kind!r} part" if isinstance(kind, str) else "not a {type, text} object"
            raise BadRequest(f"'{at}' is {shown}; this server takes {' and '.join(kinds)} parts only", at)
        if not isinstance(part.get("text"), str) or set(part) - {"type", "text", "annotations", "logprobs"}:
            raise BadRequest(f'\'{at}\' must be {{"type": "{kind}", "text": string}}', at)
        parts.append({"type": "text", "text": part["text"]})  # chat_prompt joins text parts
    return {"role": role, "content": parts}


# --- the answer --------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object, its details included (no prompt cache, no reasoning: zeros)."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


@dataclass
class Answer:
    """One response as it is made: ids, times, and the response object at each of its states."""

    rr: ResponsesRequest
    name: str
    choice: Choice
    id: str = ""
    item_id: str = ""
    created_at: int = 0

    def __post_init__(self) -> None:
        self.id, self.item_id, self.created_at = new_id("resp"), new_id("msg"), int(time.time())

    def status(self) -> str:
        """completed (end of text), or incomplete (the token limit or the context's end): once finished."""
        return "completed" if self.choice.finish == "stop" else "incomplete"

    def item(self, status: str) -> dict[str, Any]:
        return message_item(self.item_id, status, [output_text(self.choice.text)])

    def response(self, status: str, output: list[dict[str, Any]], error: str | None = None) -> dict[str, Any]:
        """The response object; usage once it has run (any status but in_progress)."""
        running = status == "in_progress"
        prompt = len(self.rr.request.prompts[0])
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None if error is None else {"code": "server_error", "message": error},
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            **self.rr.echo,
            "max_tool_calls": None,
            "model": self.name,
            "output": output,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tools": [],
            "top_logprobs": 0,
            "truncation": "disabled",
            "usage": None if running else usage(prompt, self.choice.n_tokens),
        }


async def complete(
    request: Any, name: str, rr: ResponsesRequest, handles: list[Handle], choice: Choice
) -> JSONResponse:
    """The whole response object once the job ended (or OpenAI's error body if it failed)."""
    from fastapi.responses import JSONResponse

    failed: list[Finished] = []
    async for _, ev in events(request, handles):
        if isinstance(ev, Token):
            choice.add(ev)
        elif isinstance(ev, Finished):
            if ev.reason not in ("stop", "length"):
                failed.append(ev)
            choice.end(ev.reason)
    problem = failure(failed)
    if problem is not None:
        return error_response(*problem)
    answer = Answer(rr, name, choice)
    status = answer.status()
    return JSONResponse(answer.response(status, [answer.item(status)]))


async def stream(
    request: Any, name: str, rr: ResponsesRequest, handles: list[Handle], choice: Choice
) -> AsyncIterator[str]:
    """Server-sent events: the documented sequence of a text response (see the module docstring)."""
    answer = Answer(rr, name, choice)
    seq = iter(range(1 << 62))
    where = {"item_id": answer.item_id, "output_index": 0}

    def event(kind: str, **fields: Any) -> str:
        data = {"type": kind, **fields, "sequence_number": next(seq)}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    yield event("response.created", response=answer.response("in_progress", []))
    yield event("response.in_progress", response=answer.response("in_progress", []))
    yield event(
        "response.output_item.added", output_index=0, item=message_item(answer.item_id, "in_progress", [])
    )
    yield event("response.content_part.added", **where, content_index=0, part=output_text(""))
    async with contextlib.aclosing(_pieces(request, handles, choice)) as pieces:
        async for text, finished in pieces:
            if text:
                yield event("response.output_text.delta", **where, content_index=0, delta=text, logprobs=[])
            if finished is not None and finished.reason not in ("stop", "length"):
                _, message = failure([finished]) or (500, "internal error")
                output = [answer.item("incomplete")]
                yield event("response.failed", response=answer.response("failed", output, error=message))
                return
    part = output_text(choice.text)
    yield event("response.output_text.done", **where, content_index=0, text=choice.text, logprobs=[])
    yield event("response.content_part.done", **where, content_index=0, part=part)
    status = answer.status()
    yield event("response.output_item.done", output_index=0, item=answer.item(status))
    final = "response.completed" if status == "completed" else "response.incomplete"
    yield event(final, response=answer.response(status, [answer.item(status)]))


async def _pieces(
    request: Any, handles: list[Handle], choice: Choice
) -> AsyncGenerator[tuple[str, Finished | None], None]:
    """(text to send now, the Finished event once the job ended) as the job's events come."""
    async for _, ev in events(request, handles):
        if isinstance(ev, Token):
            yield choice.add(ev), None
        elif isinstance(ev, Finished):
            yield choice.end(ev.reason), ev
