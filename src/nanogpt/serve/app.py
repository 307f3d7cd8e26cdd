"""`nanogpt serve`: an OpenAI-compatible HTTP server for a checkpoint (FastAPI + uvicorn, the `serve` extra).

Endpoints: `GET /v1/models` and `/v1/models/{id}` (`routes.py`), `POST /v1/completions` (prompt as a
string, a token-id list, or a list of either; `echo`, `logprobs` = top-k alternatives per token, prompt
tokens included when `echo` is true, so `echo=true, max_tokens=0, logprobs=k` scores a prompt: what a
token-level distillation teacher needs), `POST /v1/chat/completions` and `GET /health`. The request
fields (`n`, `logit_bias`, the penalties, `stream` as server-sent events, ...) are read and checked by
`requests.parse_request`; errors are OpenAI's body for every status (`errors.py`). Generation uses the
KV-cached generator of `generate.py`.

A base model has no chat format, so chat uses a plain concatenation template, one "role: content" line
per message and then "assistant:" (see `chat_prompt`). `return_tokens_as_token_ids: true` (vLLM's name)
writes tokens as "token_id:N" so clients get exact ids even for partial UTF-8 bytes.

Binds 127.0.0.1 unless told otherwise (`--port 0`: any free port), before the model loads, and prints its
"on http://HOST:PORT/v1" line only once the socket is bound; `--api-key-env NAME` requires
`Authorization: Bearer $NAME`. Malformed requests (NaN or Infinity, a wrong type, a field this server
cannot honour) get a 400 naming the field; a `model` other than the served one a 404; at most `--max-concurrent` generations run at once; one log line
per request goes to stderr (method, path, status, milliseconds; never a header).

    app = create_app(Engine(load_model("runs/tiny"), "tiny"))  # `nanogpt serve` runs it with uvicorn
"""
# no `from __future__ import annotations`: FastAPI must see the real `Request` class on the handlers

import json
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nanogpt.data.tokenizer import EOT_ID, Tokenizer, get_tokenizer
from nanogpt.errors import UserError
from nanogpt.infer.sampling import SamplingParams
from nanogpt.kernels.decode import decode_step
from nanogpt.kernels.device import autocast, torch_dtype
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.serve.errors import (
    DEFAULT_MAX_BODY_BYTES,
    error_body,
    error_response,
    install_error_handlers,
    internal_error_response,
    model_not_found,
)
from nanogpt.serve.requests import (
    BadRequest,
    CompletionRequest,
    check_context,
    parse_json_body,
    parse_request,
)
from nanogpt.serve.routes import add_model_routes

# --- output formatting ----------------------------------------------------------------------------------------


def token_str(t: int, tok: Tokenizer, as_ids: bool) -> str:
    return f"token_id:{t}" if as_ids else tok.decode_bytes([t]).decode("utf-8", errors="replace")


def top_alternatives(logp: torch.Tensor, k: int, tok: Tokenizer, as_ids: bool) -> dict[str, float]:
    """The k most likely tokens of a (V,) log-prob row as {token: logprob}."""
    if k == 0:
        return {}
    vals, ids = torch.topk(logp, k)
    return completion_top({i: v for i, v in zip(ids.tolist(), vals.tolist(), strict=True)}, tok, as_ids)


def top_ids(logp: torch.Tensor, k: int) -> dict[int, float]:
    """The k most likely token ids of a (V,) log-prob row as {id: logprob}, most likely first."""
    if k == 0:
        return {}
    vals, ids = torch.topk(logp, k)
    return dict(zip(ids.tolist(), vals.tolist(), strict=True))


def completion_top(top: dict[int, float], tok: Tokenizer, as_ids: bool) -> dict[str, float]:
    """{id: logprob} as the completions API writes top_logprobs: {token: logprob}."""
    out: dict[str, float] = {}
    for i, v in top.items():
        out.setdefault(token_str(i, tok, as_ids), v)  # two partial-byte tokens may print alike
    return out


def chat_logprob(token: int, logprob: float, top: dict[int, float], tok: Tokenizer, as_ids: bool) -> dict:
    """One entry of the chat API's `logprobs.content`: token, logprob, bytes, top_logprobs."""

    def entry(t: int, lp: float) -> dict[str, Any]:
        return {"token": token_str(t, tok, as_ids), "logprob": lp, "bytes": list(tok.decode_bytes([t]))}

    return {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top.items()]}


# --- the engine: one model, a bound on concurrent work ------------------------------------------------------


class Engine:
    """Scoring and generation for one model; `slots` bounds concurrent work (a semaphore)."""

    def __init__(
        self, model: NanoGPTLMHeadModel, name: str, max_concurrent: int = 2, dtype: str = "fp32"
    ) -> None:
        self.model, self.name, self.tok, self.dtype = model.eval(), name, get_tokenizer(), dtype
        self.slots = threading.BoundedSemaphore(max_concurrent)
        self.ctx = model.config.context_length

    @torch.inference_mode()
    def score(self, ids: list[int]) -> torch.Tensor:
        """Log-probs (len(ids) - 1, V): row i is the distribution of token i+1 given tokens 0..i."""
        if len(ids) - 1 > self.ctx:
            raise BadRequest(f"prompt is {len(ids)} tokens; scoring needs at most {self.ctx + 1}")
        if len(ids) < 2:
            return torch.zeros(0, self.model.config.vocab_size)
        device = next(self.model.parameters()).device
        # bf16 on CPU: take turns with the decode steps of other streams (see kernels.decode)
        step = decode_step(device, torch_dtype(self.dtype), one_row=False, use_copies=False)
        with step, autocast(device, self.dtype):
            logits = self.model(torch.tensor([ids[:-1]], device=device))[0].float()
        return F.log_softmax(logits, dim=-1).cpu()

    def prompt_logprobs(self, ids: list[int], k: int, as_ids: bool) -> dict[str, list[Any]]:
        logp = self.score(ids)
        tokens = [token_str(t, self.tok, as_ids) for t in ids]
        token_lp: list[float | None] = [None]
        top: list[dict[str, float] | None] = [None]
        for i in range(1, len(ids)):
            token_lp.append(float(logp[i - 1, ids[i]]))
            top.append(top_alternatives(logp[i - 1], k, self.tok, as_ids))
        return {"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": top}

    def steps(self, ids: list[int], s: SamplingParams) -> Iterator[tuple[int, torch.Tensor]]:
        from nanogpt.infer.generate import decode_steps

        if len(ids) > self.ctx:
            raise BadRequest(f"prompt is {len(ids)} tokens, the model's context is {self.ctx}")
        try:
            return decode_steps(self.model, ids, s, dtype=self.dtype)
        except UserError as e:
            raise BadRequest(str(e)) from None


@dataclass
class Piece:
    """One generated token's text (possibly "" mid-character) and its logprob entry."""

    text: str
    token: int
    logprob: float
    top: dict[int, float] | None  # the top alternatives {id: logprob}, when logprobs were asked for


def generate_pieces(
    engine: Engine, ids: list[int], s: SamplingParams, logprobs: int | None
) -> Iterator[Piece | str]:
    """Pieces of new text; ends at EOT or max_tokens; a final str is the finish reason ("stop"/"length").

    Stop strings end the text before the stop (it is not returned).
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, emitted, n = "", 0, 0
    hold = max((len(x) for x in s.stop), default=1) - 1  # characters kept back that may begin a stop
    for token, logits in engine.steps(ids, s):
        n += 1
        if token == EOT_ID:
            yield "stop"
            return
        logp = F.log_softmax(logits.float(), dim=-1)
        text += decoder.decode(engine.tok.decode_bytes([token]))
        top = top_ids(logp, logprobs) if logprobs is not None else None
        cut = min((i for i in (text.find(x) for x in s.stop) if i >= 0), default=-1)
        if cut >= 0:
            yield Piece(text[emitted:cut], token, float(logp[token]), top)
            yield "stop"
            return
        safe = max(emitted, len(text) - hold) if s.stop else len(text)
        yield Piece(text[emitted:safe], token, float(logp[token]), top)
        emitted = safe
    if emitted < len(text):
        yield Piece(text[emitted:], -1, 0.0, None)  # text held back for a stop that never came
    yield "length" if n >= s.max_tokens else "stop"


# --- the app ------------------------------------------------------------------------------------------------


def create_app(engine: Engine, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    """The FastAPI app serving `engine`; `api_key` (if given) is required as a bearer token; request bodies
    over `max_body_bytes` are refused (413)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="nanogpt", docs_url=None, redoc_url=None)
    install_error_handlers(app, max_body_bytes)  # before the middleware below: the body limit sits inside it

    @app.middleware("http")
    async def log_and_guard(request: Request, call_next):
        start = time.perf_counter()
        if api_key is not None and request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "")
            if not secrets.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                response = error_response(
                    401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key"
                )
                _log(request, response.status_code, start)
                return response
        try:
            response = await call_next(request)
        except Exception as e:  # never a crash: a 500 with one line
            response = internal_error_response(e)
        _log(request, response.status_code, start)
        return response

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    add_model_routes(app, engine.name, engine.ctx)
    vocab_size = min(engine.tok.vocab_size, engine.model.config.vocab_size)  # logit_bias ids index the logits

    async def handle(request: Request, chat: bool):
        try:
            req = parse_request(
                parse_json_body(await request.body()), engine.tok, chat=chat, vocab_size=vocab_size
            )
            if req.model is not None and req.model != engine.name:
                return model_not_found(req.model, engine.name)
            check_context(req, engine.ctx)  # a 400 now: once streaming starts the status is sent
            if req.stream:
                return StreamingResponse(_sse(engine, req), media_type="text/event-stream")
            result = await run_in_threadpool(_complete, engine, req)
            return JSONResponse(result)
        except BadRequest as e:
            return error_response(400, e.message, param=e.param, code=e.code)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


def _log(request: Any, status: int, start: float) -> None:
    ms = (time.perf_counter() - start) * 1000
    print(
        f"nanogpt serve: {request.method} {request.url.path} {status} {ms:.0f}ms", file=sys.stderr, flush=True
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _pieces(engine: Engine, ids: list[int], req: CompletionRequest, choice: int) -> Iterator[Piece | str]:
    s = req.sampling_for(choice)
    return generate_pieces(engine, ids, s, req.logprobs) if s.max_tokens > 0 else iter(["length"])


def _complete(engine: Engine, req: CompletionRequest) -> dict[str, Any]:
    """The whole answer: n choices per prompt, choice index = prompt index * n + choice."""
    choices, prompt_tokens, completion_tokens = [], 0, 0
    tok, as_ids, k = engine.tok, req.token_ids, req.logprobs
    with engine.slots:
        for p, ids in enumerate(req.prompts):
            prompt_tokens += len(ids)  # once per prompt, however many choices
            echoed = None
            if req.echo and k is not None:
                echoed = engine.prompt_logprobs(ids, k, as_ids)
            for c in range(req.n):
                lp: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
                if echoed is not None:
                    lp = {key: list(v) for key, v in echoed.items()}
                content: list[dict[str, Any]] = []
                text = tok.decode(ids) if req.echo else ""
                finish = "length"
                for piece in _pieces(engine, ids, req, c):
                    if isinstance(piece, str):
                        finish = piece
                        continue
                    text += piece.text
                    if piece.token >= 0:
                        completion_tokens += 1
                        if k is not None:
                            top = piece.top or {}
                            lp["tokens"].append(token_str(piece.token, tok, as_ids))
                            lp["token_logprobs"].append(piece.logprob)
                            lp["top_logprobs"].append(completion_top(top, tok, as_ids))
                            content.append(chat_logprob(piece.token, piece.logprob, top, tok, as_ids))
                index = p * req.n + c
                if req.chat:
                    choices.append(
                        {
                            "index": index,
                            "message": {"role": "assistant", "content": text},
                            "logprobs": None if k is None else {"content": content, "refusal": None},
                            "finish_reason": finish,
                        }
                    )
                else:
                    logprobs = None if k is None else lp
                    choices.append(
                        {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
                    )
    return {
        "id": ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24],
        "object": "chat.completion" if req.chat else "text_completion",
        "created": int(time.time()),
        "model": engine.name,
        "choices": choices,
        "usage": _usage(prompt_tokens, completion_tokens),
    }


def _sse(engine: Engine, req: CompletionRequest) -> Iterator[str]:
    """Server-sent events: per choice, chunks of text and a final chunk with finish_reason; then the usage
    chunk (stream_options.include_usage) and [DONE]. Choices stream one after another, by index."""
    chat, tok, as_ids, k = req.chat, engine.tok, req.token_ids, req.logprobs
    cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    obj = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())

    def event(choices: list[dict[str, Any]], usage: Any = None) -> str:
        data = {"id": cid, "object": obj, "created": created, "model": engine.name, "choices": choices}
        if req.include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    def chunk(index: int, text: str | None, finish: str | None, logprobs: Any = None) -> str:
        if chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return event([choice])

    prompt_tokens = completion_tokens = 0
    with engine.slots:
        try:
            for p, ids in enumerate(req.prompts):
                prompt_tokens += len(ids)
                for c in range(req.n):
                    index = p * req.n + c
                    if chat:
                        role = {"role": "assistant", "content": ""}
                        yield event(
                            [{"index": index, "delta": role, "logprobs": None, "finish_reason": None}]
                        )
                    elif req.echo:
                        yield chunk(index, tok.decode(ids), None)
                    for piece in _pieces(engine, ids, req, c):
                        if isinstance(piece, str):
                            yield chunk(index, None if chat else "", piece)
                            continue
                        lp = None
                        if piece.token >= 0:
                            completion_tokens += 1
                            if k is not None:
                                top = piece.top or {}
                                if chat:
                                    entry = chat_logprob(piece.token, piece.logprob, top, tok, as_ids)
                                    lp = {"content": [entry], "refusal": None}
                                else:
                                    lp = {
                                        "tokens": [token_str(piece.token, tok, as_ids)],
                                        "token_logprobs": [piece.logprob],
                                        "top_logprobs": [completion_top(top, tok, as_ids)],
                                    }
                        if piece.text or lp:
                            yield chunk(index, piece.text, None, lp)
        except BadRequest as e:  # too late for a status code: report in the stream
            yield f"data: {json.dumps(error_body(e.message, 'invalid_request_error', e.param, e.code))}\n\n"
    if req.include_usage:
        yield event([], _usage(prompt_tokens, completion_tokens))
    yield "data: [DONE]\n\n"
