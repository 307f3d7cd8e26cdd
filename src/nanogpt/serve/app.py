"""`nanogpt serve`: the OpenAI-compatible HTTP API in front of the engine (FastAPI + uvicorn, the `serve` extra).

Endpoints: `POST /v1/completions` (a prompt as a string, token ids, or a list of either; `echo`, `logprobs`
= top-k alternatives per token, the prompt's own included when `echo` is true, so `echo=true, max_tokens=0,
logprobs=k` scores a prompt: what a token-level distillation teacher sends), `POST /v1/chat/completions`,
`GET /v1/models[/{id}]`, `GET /health` (503 while shutting down) and `GET /metrics` (Prometheus).
What a request may hold is `requests.py`'s to say; every error has OpenAI's body (`errors.py`).

Each choice of a request is one `Job` of the engine (`engine.py`), which batches every running sequence.
This module turns the engine's token events into text (stop strings held back until they cannot match)
and OpenAI's answers, streamed as server-sent events or whole. A client that goes away cancels its jobs
before the engine's next step; a request past `request_timeout` seconds is cancelled ("timeout"); a full
queue answers 429 with Retry-After.

A base model has no chat format, so chat uses a plain template, one "role: content" line per message and
then "assistant:" (`requests.chat_prompt`). `return_tokens_as_token_ids: true` (vLLM's name) writes tokens
as "token_id:N" so clients get exact ids even for partial UTF-8 bytes.

    app = create_app(Engine(load_model("runs/tiny"), "tiny"))  # `nanogpt serve` runs it with uvicorn
"""
# no `from __future__ import annotations`: FastAPI must see the real `Request` class on the handlers

import asyncio
import codecs
import json
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from nanogpt.data.tokenizer import Tokenizer, get_tokenizer
from nanogpt.serve.engine import Engine, EngineClosed, Finished, Job, PromptScores, QueueFull, Token
from nanogpt.serve.errors import (
    DEFAULT_MAX_BODY_BYTES,
    error_body,
    error_response,
    error_type,
    install_error_handlers,
    model_not_found,
)
from nanogpt.serve.metrics import Metrics
from nanogpt.serve.requests import (
    BadRequest,
    CompletionRequest,
    check_context,
    parse_json_body,
    parse_request,
)
from nanogpt.serve.routes import add_model_routes

KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

# --- one choice: token events -> text, stop strings, logprobs ----------------------------------------------


def token_str(t: int, tok: Tokenizer, as_ids: bool) -> str:
    return f"token_id:{t}" if as_ids else tok.decode_bytes([t]).decode("utf-8", errors="replace")


class Choice:
    """The text of one choice as its tokens arrive: what may be sent now, and its logprob entries."""

    def __init__(self, index: int, req: CompletionRequest, tok: Tokenizer) -> None:
        self.index, self.req, self.tok = index, req, tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent = "", 0  # all text decoded so far; how much of it was handed out
        self.hold = max((len(s) for s in req.sampling.stop), default=1) - 1  # may begin a stop string
        self.finish: str | None = None
        self.n_tokens = 0
        self.logprobs: list[tuple[int, float | None, list[tuple[int, float]] | None]] = []  # this chunk's
        self.prompt_scores: PromptScores | None = None

    def add(self, ev: Token) -> str:
        """Take one token; return the text that can be sent now ("" while a character or a stop is pending)."""
        self.n_tokens += 1
        self.text += self.decoder.decode(self.tok.decode_bytes([ev.id]))
        stops = [
            i
            for i in (self.text.find(s, max(0, self.sent - self.hold)) for s in self.req.sampling.stop)
            if i >= 0
        ]
        if stops:
            self.text, self.finish = self.text[: min(stops)], "stop"
            return self._take(len(self.text))
        if self.req.logprobs is not None:
            self.logprobs.append((ev.id, ev.logprob, ev.top))
        return self._take(len(self.text) - self.hold if self.req.sampling.stop else len(self.text))

    def end(self, reason: str) -> str:
        """The finish reason is known: the held-back text goes out (unless a stop string ended it)."""
        if self.finish is None:
            self.text += self.decoder.decode(b"", final=True)
            self.finish = reason
        return self._take(len(self.text))

    def prompt_text(self) -> str:
        return self.tok.decode(self.req.prompts[self.index // self.req.n])

    def _take(self, upto: int) -> str:
        piece = self.text[self.sent : max(self.sent, upto)]
        self.sent += len(piece)
        return piece

    def logprob_fields(self, include_prompt: bool) -> Any:
        """This choice's logprobs so far, in the endpoint's format; the entries are handed out once."""
        entries, self.logprobs = self.logprobs, []
        as_ids = self.req.token_ids
        if self.req.chat:
            return {"content": [self._chat_entry(t, lp, top) for t, lp, top in entries]}
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
        if include_prompt and self.prompt_scores is not None:
            ids = self.req.prompts[self.index // self.req.n]
            out["tokens"] += [token_str(t, self.tok, as_ids) for t in ids]
            out["token_logprobs"] += self.prompt_scores.logprobs
            out["top_logprobs"] += [None if t is None else self._top(t) for t in self.prompt_scores.top]
        for t, lp, top in entries:
            out["tokens"].append(token_str(t, self.tok, as_ids))
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(self._top(top or []))
        return out

    def _top(self, top: list[tuple[int, float]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for t, lp in top:
            out.setdefault(token_str(t, self.tok, self.req.token_ids), lp)  # partial bytes may print alike
        return out

    def _chat_entry(self, t: int, lp: float | None, top: list[tuple[int, float]] | None) -> dict[str, Any]:
        def one(t: int, lp: float | None) -> dict[str, Any]:
            raw = self.tok.decode_bytes([t])
            return {"token": token_str(t, self.tok, self.req.token_ids), "logprob": lp, "bytes": list(raw)}

        return {**one(t, lp), "top_logprobs": [one(a, v) for a, v in top or []]}


# --- the app ------------------------------------------------------------------------------------------------


class Guard:
    """ASGI middleware: the API key on /v1/, one log line and the metrics of every request.

    Plain ASGI rather than FastAPI's `http` middleware, which would stand between a streaming answer and
    the client's disconnect.
    """

    def __init__(self, app: Any, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500
        path = scope["path"]

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path.startswith("/v1/"):
                got = dict(scope["headers"]).get(b"authorization", b"")
                if not secrets.compare_digest(got, f"Bearer {self.api_key}".encode()):
                    message = "missing or wrong API key (Authorization: Bearer KEY)"
                    await error_response(401, message, code="invalid_api_key")(scope, receive, send_status)
                    return
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.request(path if path in KNOWN_PATHS else "other", status, seconds)
            method = scope.get("method", "")
            print(
                f"nanogpt serve: {method} {path} {status} {seconds * 1000:.0f}ms", file=sys.stderr, flush=True
            )


def create_app(
    engine: Engine,
    api_key: str | None = None,
    *,
    request_timeout: float | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
):
    """The FastAPI app serving `engine`; `api_key` (if given) is required as a bearer token."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    app = FastAPI(title="nanogpt", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(engine)
    engine.on_event = metrics.on_event
    install_error_handlers(app, max_body_bytes)  # before Guard: the body limit sits inside it
    app.add_middleware(Guard, api_key=api_key, metrics=metrics)
    add_model_routes(app, engine.name, engine.context_length)
    tok = get_tokenizer()

    @app.get("/health")
    def health():
        if engine.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}  # the queue and the batch are on /metrics

    @app.get("/metrics")
    def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def handle(request: Request, chat: bool):
        try:
            req = parse_request(
                parse_json_body(await request.body()), tok, chat=chat, vocab_size=engine.cfg.vocab_size
            )
            if req.model is not None and req.model != engine.name:
                return model_not_found(req.model, engine.name)
            check_context(req, engine.context_length)
        except BadRequest as e:
            return error_response(400, str(e), param=e.param, code=e.code)
        deadline = time.monotonic() + request_timeout if request_timeout else None
        handles = []
        try:
            for ids in req.prompts:
                for c in range(req.n):
                    job = Job(
                        ids,
                        req.sampling_for(c),
                        logprobs=req.logprobs,
                        score_prompt=req.echo and req.logprobs is not None,
                        prompt_top=req.logprobs or 0,
                        deadline=deadline,
                    )
                    handles.append(engine.submit(job, asyncio.get_running_loop()))
        except QueueFull as e:
            for h in handles:
                h.cancel()
            return error_response(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": "1"})
        except EngineClosed as e:
            for h in handles:
                h.cancel()
            return error_response(503, f"{e}; retry on another server")
        choices = [Choice(i, req, tok) for i in range(len(handles))]
        if req.stream:
            return StreamingResponse(
                _sse(request, engine.name, req, handles, choices), media_type="text/event-stream"
            )
        return await _complete(request, engine.name, req, handles, choices)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


# --- answers -------------------------------------------------------------------------------------------------


async def _events(request: Any, handles: list) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, event) from every handle as they come; a client that leaves cancels them all."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: Any) -> None:
        async for ev in h:
            await merged.put((i, ev))

    async def watch() -> None:  # the ASGI receive channel says "http.disconnect" when the client leaves
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for h in handles:
            h.cancel()

    pumps = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    watcher = asyncio.ensure_future(watch())
    try:
        unfinished = len(handles)
        while unfinished:
            i, ev = await merged.get()
            yield i, ev
            unfinished -= isinstance(ev, Finished)
    finally:
        for h in handles:
            h.cancel()  # a no-op for finished jobs; stops the rest when the answer was abandoned
        watcher.cancel()
        for p in pumps:
            p.cancel()


def _failure(failed: list[Finished]) -> tuple[int, str] | None:
    """The error of a request whose job ended without an answer (timeout, shutdown, engine error)."""
    for f in failed:
        if f.reason == "timeout":
            return 408, "the request took longer than this server's --request-timeout"
        if f.reason == "cancelled":
            return 503, f.message or "the request was cancelled"
        if f.reason == "error":
            return 500, f"internal error: {f.message}"
    return None


def _usage(req: CompletionRequest, choices: list[Choice]) -> dict[str, int]:
    prompt = sum(len(ids) for ids in req.prompts)
    completion = sum(c.n_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _complete(request: Any, name: str, req: CompletionRequest, handles: list, choices: list[Choice]):
    from fastapi.responses import JSONResponse

    failed: list[Finished] = []
    async for i, ev in _events(request, handles):
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
    failure = _failure(failed)
    if failure is not None:
        return error_response(*failure)
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


async def _sse(request: Any, name: str, req: CompletionRequest, handles: list, choices: list[Choice]):
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
    async for i, ev in _events(request, handles):
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
                status, message = _failure([ev]) or (500, "internal error")
                yield f"data: {json.dumps(error_body(message, error_type(status)))}\n\n"  # too late for a status
                continue
            if rest:
                yield chunk([piece(c, rest, None)])
            yield chunk([piece(c, None, c.finish)])
    if req.include_usage:
        yield chunk([], _usage(req, choices))
    yield "data: [DONE]\n\n"
