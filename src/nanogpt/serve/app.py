"""`nanogpt serve`: the OpenAI-compatible HTTP API in front of the engine (FastAPI + uvicorn, the `serve` extra).

Endpoints: `POST /v1/completions` (a prompt as a string, token ids, or a list of either; `echo`, `logprobs`
= top-k alternatives per token, the prompt's own included when `echo` is true, so `echo=true, max_tokens=0,
logprobs=k` scores a prompt: what a token-level distillation teacher sends), `POST /v1/chat/completions`,
`POST /v1/responses` (OpenAI's Responses API on the chat path: `responses.py`), `GET /v1/models[/{id}]`,
`GET /health` (503 while shutting down) and `GET /metrics` (Prometheus); the playground page at `/` with its
two endpoints, `POST /v1/nanogpt/attention` and `GET /v1/nanogpt/run` (`playground.py`).
What a request may hold is `requests.py`'s to say; every error has OpenAI's body (`errors.py`).

Each choice of a request is one `Job` of the engine (`engine.py`), which batches every running sequence.
`choices.py` turns the engine's token events into text (stop strings held back until they cannot match);
this module makes OpenAI's answers of it, streamed as server-sent events or whole. A client that goes away cancels its jobs
before the engine's next step; a request past `request_timeout` seconds is cancelled ("timeout"); a full
queue answers 429 with Retry-After, a request of more choices than the whole queue a 400.

Chat messages are rendered in the one chat template that fine-tuning trains on (`nanogpt.data.chat`:
"User:\nHi<|endoftext|>Assistant:\n"; `requests.chat_prompt`), and a reply ends at `<|endoftext|>`.
`return_tokens_as_token_ids: true` (vLLM's name) writes tokens as "token_id:N" so clients get exact ids
even for partial UTF-8 bytes.

    app = create_app(Engine(load_model("runs/tiny"), "tiny"))  # `nanogpt serve` runs it with uvicorn
"""
# no `from __future__ import annotations`: FastAPI must see the real `Request` class on the handlers

import asyncio
import json
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.serve import responses
from nanogpt.serve.choices import Choice, events, failure
from nanogpt.serve.engine import Engine, EngineClosed, Finished, Handle, Job, PromptScores, QueueFull, Token
from nanogpt.serve.errors import (
    DEFAULT_MAX_BODY_BYTES,
    ApiError,
    error_body,
    error_response,
    error_type,
    install_error_handlers,
    model_not_found_error,
)
from nanogpt.serve.metrics import Metrics
from nanogpt.serve.playground import add_playground_routes
from nanogpt.serve.requests import (
    BadRequest,
    CompletionRequest,
    check_context,
    check_queue,
    parse_json_body,
    parse_request,
)
from nanogpt.serve.responses import parse_responses
from nanogpt.serve.routes import add_model_routes

if TYPE_CHECKING:  # the serve extra is imported where it is used, never at import time
    from fastapi import FastAPI
    from starlette.responses import JSONResponse

Message = MutableMapping[str, Any]  # an ASGI message

KNOWN_PATHS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/models",
    "/health",
    "/metrics",
    "/",
    "/v1/nanogpt/attention",
    "/v1/nanogpt/run",
)

# --- the app ------------------------------------------------------------------------------------------------


CLIENT_GONE = 499  # nginx's "client closed request": the status logged and counted for a client that left


def bearer_token(header: bytes) -> bytes | None:
    """The token of an `Authorization: Bearer TOKEN` header; the scheme is case-insensitive (RFC 7235)."""
    scheme, _, token = header.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


class Guard:
    """ASGI middleware: the API key on /v1/, one log line and the metrics of every request.

    A request whose client went away before the last byte of its answer (while still sending its body,
    waiting for a whole answer, or reading a stream) is logged and counted as 499, whatever the app
    answered into the closed connection. Plain ASGI rather than FastAPI's `http` middleware, which would
    stand between a streaming answer and the client's disconnect.
    """

    def __init__(self, app: Any, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500
        path = scope["path"]
        answered = gone = False

        async def send_status(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        async def watched_receive() -> Message:
            nonlocal gone
            message: Message = await receive()
            gone = gone or (message["type"] == "http.disconnect" and not answered)
            return message

        try:
            if self.api_key is not None and path.startswith("/v1/"):
                token = bearer_token(dict(scope["headers"]).get(b"authorization", b""))
                if token is None or not secrets.compare_digest(token, self.api_key.encode()):
                    message = "missing or wrong API key (Authorization: Bearer KEY)"
                    await error_response(401, message, code="invalid_api_key")(scope, receive, send_status)
                    return
            await self.app(scope, watched_receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            status = CLIENT_GONE if gone else status
            self.metrics.request(path if path in KNOWN_PATHS else "other", status, seconds)
            method = scope.get("method", "")
            print(
                f"nanogpt serve: {method} {path} {status} {seconds * 1000:.0f}ms"
                + (" (the client disconnected)" if gone else ""),
                file=sys.stderr,
                flush=True,
            )


def create_app(
    engine: Engine,
    api_key: str | None = None,
    *,
    request_timeout: float | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    model_path: Path | None = None,
    dtype: str | None = None,
) -> "FastAPI":
    """The FastAPI app serving `engine`; `api_key` (if given) is required as a bearer token.

    `model_path` (the folder the model was loaded from) and `dtype` (as asked: int8 computes in fp32) are
    what the playground's `GET /v1/nanogpt/run` reports; without a path it reports the config only.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    app = FastAPI(title="nanogpt", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(engine)
    engine.on_event = metrics.on_event
    install_error_handlers(app, max_body_bytes)  # before Guard: the body limit sits inside it
    app.add_middleware(Guard, api_key=api_key, metrics=metrics)
    add_model_routes(app, engine.name, engine.context_length)
    tok = get_tokenizer()
    add_playground_routes(
        app, engine, tok, model_path=model_path, dtype=dtype or engine.dtype, request_timeout=request_timeout
    )

    # every handler returns a Response (FastAPI then builds no response model from the annotation)
    @app.get("/health")
    def health() -> Response:
        if engine.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})  # the queue and the batch are on /metrics

    @app.get("/metrics")
    def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def handle(request: Request, chat: bool) -> Response:
        try:
            req = parse_request(
                parse_json_body(await request.body()), tok, chat=chat, vocab_size=engine.cfg.vocab_size
            )
            check(engine, req)
        except BadRequest as e:
            return error_response(400, str(e), param=e.param, code=e.code)
        handles = submit(engine, req, request_timeout)
        choices = [Choice(i, req, tok) for i in range(len(handles))]
        if req.stream:
            return StreamingResponse(
                _sse(request, engine.name, req, handles, choices), media_type="text/event-stream"
            )
        return await _complete(request, engine.name, req, handles, choices)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, chat=True)

    @app.post("/v1/responses")
    async def create_response(request: Request) -> Response:
        try:
            rr = parse_responses(parse_json_body(await request.body()), tok, vocab_size=engine.cfg.vocab_size)
            check(engine, rr.request, "input")
        except BadRequest as e:
            return error_response(400, str(e), param=e.param, code=e.code)
        handles = submit(engine, rr.request, request_timeout)
        choice = Choice(0, rr.request, tok)
        if rr.stream:
            return StreamingResponse(
                responses.stream(request, engine.name, rr, handles, choice), media_type="text/event-stream"
            )
        return await responses.complete(request, engine.name, rr, handles, choice)

    return app


def submit(engine: Engine, req: CompletionRequest, request_timeout: float | None) -> list[Handle]:
    """Every choice of `req` as a job of `engine`, all queued or none (ApiError 429 / 503)."""
    deadline = time.monotonic() + request_timeout if request_timeout else None
    jobs = [
        Job(
            ids,
            req.sampling_for(c),
            logprobs=req.logprobs,
            score_prompt=req.echo and req.logprobs is not None,
            prompt_top=req.logprobs or 0,
            deadline=deadline,
        )
        for ids in req.prompts
        for c in range(req.n)
    ]
    return submit_jobs(engine, jobs)


def submit_jobs(engine: Engine, jobs: list[Job]) -> list[Handle]:
    """Queue `jobs` on `engine`, all or none, from the event loop: a full queue is a 429, a closing engine a 503."""
    try:
        return engine.submit_all(jobs, asyncio.get_running_loop())
    except QueueFull as e:
        raise ApiError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
    except EngineClosed as e:
        raise ApiError(503, f"{e}; retry on another server") from None


def check(engine: Engine, req: CompletionRequest, prompt_param: str | None = None) -> None:
    """What a parsed request must also meet on this server: its model, the context, the queue."""
    if req.model is not None and req.model != engine.name:
        raise model_not_found_error(req.model, engine.name)
    check_context(req, engine.context_length, prompt_param)
    check_queue(req, engine.max_queue)


# --- answers -------------------------------------------------------------------------------------------------


def _usage(req: CompletionRequest, choices: list[Choice]) -> dict[str, int]:
    prompt = sum(len(ids) for ids in req.prompts)
    completion = sum(c.n_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _complete(
    request: Any, name: str, req: CompletionRequest, handles: list[Handle], choices: list[Choice]
) -> "JSONResponse":
    from fastapi.responses import JSONResponse

    failed: list[Finished] = []
    async for i, ev in events(request, handles):
        c = choices[i]
        if isinstance(ev, PromptScores):
            c.prompt_scores = ev
        elif isinstance(ev, Token) and c.finish is None:
            c.add(ev)
            if c.finish is not None:  # a stop string ended it: its job can stop too
                handles[i].cancel()
        elif isinstance(ev, Finished):
            if c.finish is None and ev.reason not in ("stop", "length"):
                failed.append(ev)
            c.end(ev.reason)
    problem = failure(failed)
    if problem is not None:
        return error_response(*problem)
    out = []
    for c in choices:
        if req.chat:
            choice = {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish,
            }
            choice["logprobs"] = c.logprob_fields(False) if req.logprobs is not None else None
        else:
            text = (c.prompt_text() if req.echo else "") + c.text
            lp = c.logprob_fields(include_prompt=req.echo) if req.logprobs is not None else None
            choice = {"index": c.index, "text": text, "finish_reason": c.finish, "logprobs": lp}
        out.append(choice)
    return JSONResponse(
        {
            "id": ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24],
            "object": "chat.completion" if req.chat else "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": out,
            "usage": _usage(req, choices),
        }
    )


async def _sse(
    request: Any, name: str, req: CompletionRequest, handles: list[Handle], choices: list[Choice]
) -> AsyncIterator[str]:
    """Server-sent events: text as it comes, a chunk with each finish_reason, the usage if asked, [DONE]."""
    cid = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())

    def chunk(choice_list: list[dict[str, Any]], usage: Any = None) -> str:
        data: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": created,
            "model": name,
            "choices": choice_list,
        }
        if req.include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    def piece(c: Choice, text: str | None, finish: str | None) -> dict[str, Any]:
        lp = c.logprob_fields(include_prompt=False) if req.logprobs is not None and text is not None else None
        if req.chat:
            delta = {} if text is None else {"content": text}
            return {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return {"index": c.index, "text": text or "", "logprobs": lp, "finish_reason": finish}

    for c in choices:  # the role first (chat), or the echoed prompt (completions)
        if req.chat:
            yield chunk(
                [
                    {
                        "index": c.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        elif req.echo:
            yield chunk(
                [{"index": c.index, "text": c.prompt_text(), "logprobs": None, "finish_reason": None}]
            )
    async for i, ev in events(request, handles):
        c = choices[i]
        if isinstance(ev, PromptScores):
            c.prompt_scores = ev
            if req.logprobs is not None:
                yield chunk(
                    [
                        {
                            "index": c.index,
                            "text": "",
                            "logprobs": c.logprob_fields(True),
                            "finish_reason": None,
                        }
                    ]
                )
        elif isinstance(ev, Token) and c.finish is None:
            text = c.add(ev)
            if text or c.logprobs:
                yield chunk([piece(c, text, None)])
            if c.finish is not None:  # a stop string: this choice is done; its job is told to stop
                handles[i].cancel()
        elif isinstance(ev, Finished):
            stopped = c.finish is not None
            rest = c.end(ev.reason)
            if ev.reason in ("timeout", "cancelled", "error") and not stopped:
                status, message = failure([ev]) or (500, "internal error")
                yield f"data: {json.dumps(error_body(message, error_type(status)))}\n\n"  # too late for a status
                continue
            if rest:
                yield chunk([piece(c, rest, None)])
            yield chunk([piece(c, None, c.finish)])
    if req.include_usage:
        yield chunk([], _usage(req, choices))
    yield "data: [DONE]\n\n"
