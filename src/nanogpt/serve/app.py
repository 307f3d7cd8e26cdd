"""`nanogpt serve`: an OpenAI-compatible HTTP server for a checkpoint (FastAPI + uvicorn, the `serve` extra).

Endpoints: `GET /v1/models`, `POST /v1/completions` (prompt as a string, a token-id list, or a list of
either; `echo`, `logprobs` = top-k alternatives per token, prompt tokens included when `echo` is true,
so `echo=true, max_tokens=0, logprobs=k` scores a prompt: what a token-level distillation teacher
needs; `max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop`, `stream` as server-sent events),
`POST /v1/chat/completions` and `GET /health`. Generation uses the KV-cached generator of `generate.py`.

A base model has no chat format, so chat uses a plain concatenation template, one "role: content" line
per message and then "assistant:" (see `chat_prompt`). `return_tokens_as_token_ids: true` (vLLM's name)
writes tokens as "token_id:N" so clients get exact ids even for partial UTF-8 bytes.

Binds 127.0.0.1 unless told otherwise (`--port 0`: any free port), before the model loads, and prints its
"on http://HOST:PORT/v1" line only once the socket is bound; `--api-key-env NAME` requires
`Authorization: Bearer $NAME`. Malformed requests (NaN or Infinity, a wrong type, a penalty this server
does not apply) get a 400 JSON error; at most `--max-concurrent` generations run at once; one log line
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
from nanogpt.serve.requests import (
    BadRequest,
    RequestOptions,
    chat_prompt,
    parse_options,
    parse_prompts,
)

# --- output formatting ----------------------------------------------------------------------------------------


def token_str(t: int, tok: Tokenizer, as_ids: bool) -> str:
    return f"token_id:{t}" if as_ids else tok.decode_bytes([t]).decode("utf-8", errors="replace")


def top_alternatives(logp: torch.Tensor, k: int, tok: Tokenizer, as_ids: bool) -> dict[str, float]:
    """The k most likely tokens of a (V,) log-prob row as {token: logprob}."""
    if k == 0:
        return {}
    vals, ids = torch.topk(logp, k)
    out: dict[str, float] = {}
    for v, i in zip(vals.tolist(), ids.tolist(), strict=True):
        out.setdefault(token_str(i, tok, as_ids), v)  # two partial-byte tokens may print alike
    return out


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
    top: dict[str, float] | None


def generate_pieces(engine: Engine, ids: list[int], o: RequestOptions) -> Iterator[Piece | str]:
    """Pieces of new text; ends at EOT or max_tokens; a final str is the finish reason ("stop"/"length").

    Stop strings end the text before the stop (it is not returned).
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, emitted, n = "", 0, 0
    s = o.sampling
    hold = max((len(x) for x in s.stop), default=1) - 1  # characters kept back that may begin a stop
    for token, logits in engine.steps(ids, s):
        n += 1
        if token == EOT_ID:
            yield "stop"
            return
        logp = F.log_softmax(logits.float(), dim=-1)
        text += decoder.decode(engine.tok.decode_bytes([token]))
        top = top_alternatives(logp, o.logprobs, engine.tok, o.token_ids) if o.logprobs is not None else None
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


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_app(engine: Engine, api_key: str | None = None):
    """The FastAPI app serving `engine`; `api_key` (if given) is required as a bearer token."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="nanogpt", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def log_and_guard(request: Request, call_next):
        start = time.perf_counter()
        if api_key is not None and request.url.path.startswith("/v1/"):
            got = request.headers.get("authorization", "")
            if not secrets.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                response = _error(
                    401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error"
                )
                _log(request, response.status_code, start)
                return response
        try:
            response = await call_next(request)
        except Exception as e:  # never a crash: a 500 with one line
            response = _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")
        _log(request, response.status_code, start)
        return response

    async def read_body(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        except (ValueError, RecursionError):  # an integer of over 4,300 digits; nesting deeper than the stack
            raise BadRequest("the request body holds a number too long or nesting too deep to read") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        card = {"id": engine.name, "object": "model", "created": 0, "owned_by": "nanogpt"}
        return {"object": "list", "data": [{**card, "max_model_len": engine.ctx}]}

    async def handle(request: Request, chat: bool):
        try:
            body = await read_body(request)
            if chat:
                ids_list = [engine.tok.encode(chat_prompt(body.get("messages")))]
            else:
                if "prompt" not in body:
                    raise BadRequest("'prompt' is required")
                ids_list = parse_prompts(body["prompt"], engine.tok)
            s = parse_options(body, default_max_tokens=256 if chat else 16)
            if s.stream:
                if len(ids_list) != 1:
                    raise BadRequest("stream=true takes one prompt")
                if len(ids_list[0]) > engine.ctx:  # a 400 now: once streaming starts the status is sent
                    raise BadRequest(
                        f"prompt is {len(ids_list[0])} tokens, the model's context is {engine.ctx}"
                    )
                return StreamingResponse(_sse(engine, ids_list[0], s, chat), media_type="text/event-stream")
            result = await run_in_threadpool(_complete, engine, ids_list, s, chat)
            return JSONResponse(result)
        except BadRequest as e:
            return _error(400, str(e))

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


def _complete(engine: Engine, ids_list: list[list[int]], s: RequestOptions, chat: bool) -> dict[str, Any]:
    choices, prompt_tokens, completion_tokens = [], 0, 0
    with engine.slots:
        for index, ids in enumerate(ids_list):
            prompt_tokens += len(ids)
            lp: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
            text = ""
            if s.echo and not chat:
                text = engine.tok.decode(ids)
                if s.logprobs is not None:
                    lp = engine.prompt_logprobs(ids, s.logprobs, s.token_ids)
            finish = "length"
            for p in generate_pieces(engine, ids, s) if s.sampling.max_tokens > 0 else iter(["length"]):
                if isinstance(p, str):
                    finish = p
                    continue
                text += p.text
                if p.token >= 0:
                    completion_tokens += 1
                    lp["tokens"].append(token_str(p.token, engine.tok, s.token_ids))
                    lp["token_logprobs"].append(p.logprob)
                    lp["top_logprobs"].append(p.top)
            if chat:
                choices.append(
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                    }
                )
            else:
                choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
                if s.logprobs is not None:
                    choice["logprobs"] = lp
                choices.append(choice)
    return {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": engine.name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _sse(engine: Engine, ids: list[int], s: RequestOptions, chat: bool) -> Iterator[str]:
    """Server-sent events: one chunk per piece of text, a final chunk with finish_reason, then [DONE]."""
    cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, logprobs: Any = None) -> str:
        if chat:
            choice = {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        data = {
            "id": cid,
            "object": obj,
            "created": int(time.time()),
            "model": engine.name,
            "choices": [choice],
        }
        return f"data: {json.dumps(data)}\n\n"

    with engine.slots:
        if chat:
            yield f"data: {json.dumps(_role_chunk(cid, engine.name))}\n\n"
        elif s.echo:
            yield chunk(engine.tok.decode(ids), None)
        try:
            for p in generate_pieces(engine, ids, s) if s.sampling.max_tokens > 0 else iter(["length"]):
                if isinstance(p, str):
                    yield chunk(None if chat else "", p)
                    continue
                lp = None
                if s.logprobs is not None and not chat and p.token >= 0:
                    tokens = [token_str(p.token, engine.tok, s.token_ids)]
                    lp = {"tokens": tokens, "token_logprobs": [p.logprob], "top_logprobs": [p.top]}
                if p.text or lp:
                    yield chunk(p.text, None, lp)
        except BadRequest as e:  # too late for a status code: report in the stream
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'invalid_request_error'}})}\n\n"
    yield "data: [DONE]\n\n"


def _role_chunk(cid: str, name: str) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": name,
        "choices": [choice],
    }
