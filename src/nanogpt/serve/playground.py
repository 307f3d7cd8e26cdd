"""The playground: a web page at `/` that shows how the served model works, and the two endpoints it reads.

`GET /` is `static/index.html` and `GET /static/NAME` its scripts and styles: plain files shipped as package
data, no build step, nothing fetched from elsewhere (the Content-Security-Policy header lets the page load
and connect to this server only). The page generates through the OpenAI endpoints (`app.py`) and reads
two of ours, both behind the API key like every `/v1/` route (docs/serving.md, "The playground's endpoints"):

- `POST /v1/nanogpt/attention` {"prompt": text or token ids} -> {"tokens", "ids", "layers", "heads",
  "attention": [layer][head][query][key]}: the eager attention weights of the prompt (`model.gpt`), computed
  as an engine job (`Job.attention`) on the model's thread, queued like any request (429 when full);
- `GET /v1/nanogpt/run`: the run's story (`story.py`).

    add_playground_routes(app, engine, tok, model_path=Path("runs/demo"), dtype="fp32", request_timeout=None)
"""

# no `from __future__ import annotations`: FastAPI must see the real `Request` class on the handler

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from nanogpt.data.tokenizer import Tokenizer
from nanogpt.infer.sampling import SamplingParams
from nanogpt.serve.choices import events, failure, token_str
from nanogpt.serve.engine import AttentionMaps, Engine, Finished, Job
from nanogpt.serve.errors import error_response, model_not_found_error
from nanogpt.serve.requests import BadRequest, parse_json_body, parse_prompts
from nanogpt.serve.story import run_story

STATIC = Path(__file__).parent / "static"
MEDIA_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
# the page may load and connect to this server only: no CDN, font or script from anywhere else
CSP = (
    "default-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
ATTENTION_FIELDS = frozenset({"prompt", "model"})
DECIMALS = 6  # attention weights in the answer: a row of T sums to 1 within T * 5e-7


def static_files() -> dict[str, tuple[bytes, str]]:
    """name -> (content, media type) of every file of the page, read once: nothing else is ever served."""
    return {
        p.name: (p.read_bytes(), MEDIA_TYPES[p.suffix])
        for p in sorted(STATIC.iterdir())
        if p.suffix in MEDIA_TYPES
    }


def parse_attention_request(body: dict[str, Any], tok: Tokenizer, context_length: int) -> list[int]:
    """The prompt's token ids: one string or one list of ids, at most the model's context (BadRequest)."""
    unknown = sorted(set(body) - ATTENTION_FIELDS)
    if unknown:
        raise BadRequest(
            f"unknown field {unknown[0]!r}; this endpoint reads 'prompt' (and 'model')", unknown[0]
        )
    prompt = body.get("prompt")
    if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not prompt):
        raise BadRequest("'prompt' must be a string or a list of token ids", "prompt")
    if isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise BadRequest(
            "'prompt' must be one prompt: a string or a list of token ids (not a list of them)", "prompt"
        )
    ids = parse_prompts(prompt, tok)[0]
    if len(ids) > context_length:
        raise BadRequest(
            f"the prompt is {len(ids)} tokens, the model's context is {context_length}; send a shorter prompt",
            "prompt",
            code="context_length_exceeded",
        )
    return ids


def attention_body(tokens: list[str], ids: list[int], weights: np.ndarray) -> bytes:
    """The JSON answer; the (L, H, T, T) weights rounded to `DECIMALS`, so a long prompt's answer stays
    a few bytes per weight."""
    L, H = weights.shape[:2]
    data = {
        "tokens": tokens,
        "ids": ids,
        "layers": L,
        "heads": H,
        "attention": np.round(weights.astype(np.float64), DECIMALS).tolist(),
    }
    return json.dumps(data).encode()


def add_playground_routes(
    app: Any,
    engine: Engine,
    tok: Tokenizer,
    *,
    model_path: Path | None,
    dtype: str,
    request_timeout: float | None,
) -> None:
    """Register `/`, `/static/{name}`, `POST /v1/nanogpt/attention` and `GET /v1/nanogpt/run` on `app`."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    from nanogpt.serve.app import submit_jobs  # the one place a request's jobs are queued (429 / 503)

    files = static_files()

    def static_response(name: str) -> Response:
        if name not in files:
            return error_response(404, f"no file {name!r} in the playground", code="not_found")
        content, media_type = files[name]
        headers = {
            "Content-Security-Policy": CSP,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        }
        return Response(content, media_type=media_type, headers=headers)

    def index() -> Response:
        return static_response("index.html")

    def static(name: str) -> Response:
        return static_response(name)

    async def run() -> Response:
        # files are read per request (a run still training shows its newest log), off the event loop
        story = await asyncio.to_thread(run_story, model_path, engine.cfg, engine.name, dtype)
        return JSONResponse(story)

    async def attention(request: Request) -> Response:
        try:
            body = parse_json_body(await request.body())
            if body.get("model") is not None and body["model"] != engine.name:
                raise model_not_found_error(str(body["model"]), engine.name)
            ids = parse_attention_request(body, tok, engine.context_length)
        except BadRequest as e:
            return error_response(400, str(e), param=e.param, code=e.code)
        deadline = time.monotonic() + request_timeout if request_timeout else None
        job = Job(ids, SamplingParams(max_tokens=0, temperature=0), deadline=deadline, attention=True)
        handles = submit_jobs(engine, [job])
        maps: AttentionMaps | None = None
        async for _, ev in events(request, handles):
            if isinstance(ev, AttentionMaps):
                maps = ev
            elif isinstance(ev, Finished) and ev.reason != "stop":
                return error_response(*(failure([ev]) or (500, "internal error")))
        assert maps is not None  # an attention job says "stop" only after its maps
        tokens = [token_str(t, tok, False) for t in ids]
        content = await asyncio.to_thread(attention_body, tokens, ids, maps.weights.numpy())
        return Response(content, media_type="application/json")

    # response_model=None: FastAPI builds no response model from the annotations (every handler returns a Response)
    app.add_api_route("/", index, methods=["GET"], response_model=None)
    app.add_api_route("/static/{name}", static, methods=["GET"], response_model=None)
    app.add_api_route("/v1/nanogpt/run", run, methods=["GET"], response_model=None)
    app.add_api_route("/v1/nanogpt/attention", attention, methods=["POST"], response_model=None)
