"""The server's answers over real HTTP: OpenAI-shaped errors for every status, the body limit, the model
routes, and the new request fields through the real openai and LangChain clients.

The app is `create_app` on a tiny model, run by uvicorn in a thread of this process on 127.0.0.1 (the same
app `nanogpt serve` runs; `tests/serve/test_serve.py` covers the command's own process).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import uvicorn  # noqa: E402

from nanogpt.data.tokenizer import get_tokenizer  # noqa: E402
from nanogpt.model.gpt import NanoGPTLMHeadModel  # noqa: E402
from nanogpt.serve.app import Engine, create_app  # noqa: E402
from tests.local_server import post  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402

LIMIT = 4096  # bytes of request body


@contextmanager
def running(app) -> Iterator[str]:
    """`app` served by uvicorn on a free port of 127.0.0.1 in a daemon thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def tiny_engine(**changes) -> Engine:
    torch.manual_seed(3)
    return Engine(NanoGPTLMHeadModel(tiny_config(context_length=32, **changes)), "tiny")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with running(create_app(tiny_engine(), max_body_bytes=LIMIT)) as base:
        yield base


def request(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request, error statuses included."""
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def assert_openai_error(body: dict, type: str = "invalid_request_error", param=None, code=None) -> str:
    """`body` is OpenAI's error object, exactly its four keys; returns the message."""
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    e = body["error"]
    assert (e["type"], e["param"], e["code"]) == (type, param, code), e
    assert isinstance(e["message"], str) and e["message"] and "\n" not in e["message"]
    return e["message"]


def raw_http(url: str, head: bytes, chunks: list[bytes]) -> tuple[int, dict]:
    """Send `head` (request line and headers) and `chunks` on one socket; the status and JSON answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head)
        for c in chunks:
            s.sendall(c)
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += s.recv(65536) or b"<eof>"
            assert not reply.endswith(b"<eof>"), reply
        header, body = reply.split(b"\r\n\r\n", 1)
        length = next(
            int(line.split(b":")[1])
            for line in header.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        while len(body) < length:
            more = s.recv(65536)
            assert more, body
            body += more
    return int(header.split()[1]), json.loads(body)


# --- Starlette's own statuses, as OpenAI writes them -----------------------------------------------------------


def test_unknown_route_is_an_openai_404(url):
    # (GET / is the playground page: tests/serve/test_playground.py)
    for method, path in (("GET", "/v1/nope"), ("POST", "/v1/chat/complete"), ("GET", "/nope")):
        status, body, _ = request(url + path, method, b"{}" if method == "POST" else None)
        assert status == 404
        message = assert_openai_error(body, code="unknown_url")
        assert f"{method} {path}" in message


def test_wrong_method_is_an_openai_405(url):
    status, body, headers = request(url + "/v1/completions", "GET")
    assert status == 405 and "POST" in headers["allow"]
    assert "GET" in assert_openai_error(body)
    status, body, _ = request(url + "/v1/models", "POST", b"{}")
    assert status == 405 and "GET" in assert_openai_error(body)


# --- the body limit -----------------------------------------------------------------------------------------------


def test_body_over_the_limit_by_content_length(url):
    prompt = "x" * LIMIT
    status, body = post(url + "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert status == 413
    assert str(LIMIT) in assert_openai_error(body)
    # at the limit itself the body is read (and refused for what it says, not for its size)
    status, body = post(url + "/v1/completions", None, raw=b" " * LIMIT)
    assert status == 400 and "not valid JSON" in body["error"]["message"]


def test_content_length_over_the_limit_is_refused_before_the_body_is_sent(url):
    """The header alone decides: the server answers without waiting for a body that never comes."""
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000000000\r\n\r\n"
    )
    status, body = raw_http(url, head, [])
    assert status == 413 and str(LIMIT) in assert_openai_error(body)


def test_chunked_body_is_counted_as_it_arrives(url):
    """No Content-Length: the server counts the chunks and answers 413 at the first one past the limit,
    though the body never ends (no final zero chunk is sent), so it never holds more than that."""
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b'{"prompt": "' + b"x" * 988 + b'",'  # 1,001 bytes
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * (LIMIT // len(piece) + 1)
    status, body = raw_http(url, head, chunks)
    assert status == 413 and str(LIMIT) in assert_openai_error(body)
    # a chunked body under the limit is read whole
    small = json.dumps({"prompt": "Hi", "max_tokens": 1, "temperature": 0}).encode()
    status, body = raw_http(url, head, [b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small)])
    assert status == 200 and body["usage"]["completion_tokens"] == 1


# --- models --------------------------------------------------------------------------------------------------------


def test_model_routes(url):
    status, body, _ = request(url + "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]
    status, card, _ = request(url + "/v1/models/tiny")
    assert status == 200 and card == body["data"][0] and card["max_model_len"] == 32
    for other in ("gpt-4o", "org/tiny", "tiny/"):
        status, body, _ = request(url + "/v1/models/" + other)
        assert status == 404, other
        assert repr(other) in assert_openai_error(body, code="model_not_found")


def test_other_model_is_404_on_both_endpoints(url):
    bodies = {
        "/v1/completions": {"prompt": "Hi", "max_tokens": 1},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    }
    for path, body in bodies.items():
        status, answer = post(url + path, {**body, "model": "gpt-4o"})
        assert status == 404
        assert "'gpt-4o'" in assert_openai_error(answer, param="model", code="model_not_found")
        status, answer = post(url + path, {**body, "model": "tiny"})  # the served name, or none at all
        assert status == 200 and answer["model"] == "tiny"
        assert post(url + path, body).status == 200


def test_bad_field_is_a_400_naming_it(url):
    status, body = post(url + "/v1/completions", {"prompt": "Hi", "logit_bias": {"50257": 1}})
    assert status == 400 and "not a token id" in assert_openai_error(body, param="logit_bias")
    status, body = post(
        url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 99}
    )
    assert status == 400 and assert_openai_error(body, param="n")
    status, body = post(url + "/v1/completions", {"prompt": list(range(33)), "max_tokens": 1})
    assert status == 400 and assert_openai_error(body, param="prompt", code="context_length_exceeded")


# --- an uncaught exception -----------------------------------------------------------------------------------


def test_uncaught_exception_is_a_one_line_500():
    """A checkpoint whose weights are NaN: sampling draws from NaN probabilities and torch raises inside the
    generator; the client gets OpenAI's 500 body with one line, no traceback, and the server goes on."""
    engine = tiny_engine()
    with torch.no_grad():
        for p in engine.model.parameters():
            p.fill_(float("nan"))
    with running(create_app(engine)) as base:
        status, body = post(base + "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 1})
        message = assert_openai_error(body, type="server_error")
        assert status == 500 and message.startswith("internal error: RuntimeError")
        assert "Traceback" not in message and 'File "' not in message
        with urllib.request.urlopen(base + "/health", timeout=10) as r:
            assert json.loads(r.read()) == {"status": "ok"}
        # greedy decoding of the same model takes an argmax, which does not raise: the 500 was that request's
        status, body = post(base + "/v1/completions", {"prompt": "Hi", "max_tokens": 1, "temperature": 0})
        assert status == 200


def test_validation_and_api_errors_of_other_routes():
    """The handlers serve any route of the app: FastAPI's 422 for a typed parameter, an `ApiError` raised
    by a handler (e.g. a 429 the scheduler may raise) and a bare exception, each with OpenAI's body."""
    from fastapi import FastAPI

    from nanogpt.serve.errors import ApiError, install_error_handlers

    app = FastAPI()
    install_error_handlers(app, max_body_bytes=LIMIT)

    @app.get("/v1/typed")
    def typed(count: int) -> dict:
        return {"count": count}

    @app.get("/v1/busy")
    def busy() -> dict:
        raise ApiError(
            429, "too many requests at once", code="rate_limit_exceeded", headers={"Retry-After": "1"}
        )

    @app.get("/v1/broken")
    def broken() -> dict:
        raise KeyError("line one\nline two")

    with running(app) as base:
        assert request(base + "/v1/typed?count=3")[:2] == (200, {"count": 3})
        status, body, _ = request(base + "/v1/typed?count=many")
        assert status == 422 and "count" in assert_openai_error(body, param="count")
        status, body, headers = request(base + "/v1/busy")
        assert status == 429 and headers["retry-after"] == "1"
        assert_openai_error(body, type="requests", code="rate_limit_exceeded")
        status, body, _ = request(base + "/v1/broken")
        message = assert_openai_error(body, type="server_error")
        assert status == 500 and message == "internal error: KeyError: 'line one\\nline two'"


# --- real clients ------------------------------------------------------------------------------------------------


def test_openai_client_new_fields_and_errors(url):
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    tok = get_tokenizer()
    eot = tok.eot_id
    ids = {"return_tokens_as_token_ids": True}  # vLLM's extension, as extra_body: exact ids back

    def token_ids(choice) -> list[int]:
        return [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]

    # n choices, a seed per choice, penalties; logit_bias -100 on the tokens the greedy path took bans them
    first = client.completions.create(
        model="tiny", prompt="The king", max_tokens=4, temperature=0, logprobs=0, extra_body=ids
    )
    banned = [*token_ids(first.choices[0]), eot]
    request = dict(
        model="tiny",
        prompt=["The king", "A queen"],
        max_tokens=4,
        n=3,
        seed=11,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={str(t): -100 for t in banned},
        logprobs=2,
        extra_body=ids,
    )
    out = client.completions.create(**request)
    assert [c.index for c in out.choices] == list(range(6))
    assert out.usage.prompt_tokens == len(tok.encode("The king")) + len(tok.encode("A queen"))
    for c in out.choices:
        assert len(token_ids(c)) == 4 and not set(token_ids(c)) & set(banned)
        assert all(len(top) == 2 for top in c.logprobs.top_logprobs)
    # the choices of one prompt differ (seeds 11, 12, 13); the same request again gives the same choices
    assert len({tuple(token_ids(c)) for c in out.choices[:3]}) > 1
    again = client.completions.create(**request)
    assert [token_ids(c) for c in again.choices] == [token_ids(c) for c in out.choices]
    # chat: text parts, logprobs with top alternatives, max_completion_tokens
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        max_completion_tokens=3,
        logprobs=True,
        top_logprobs=2,
        logit_bias={str(eot): -100},
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 == chat.usage.completion_tokens
    assert all(
        len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode())
        for t in content
        if "\ufffd" not in t.token
    )
    # a stream with the usage chunk last
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True,
            stream_options={"include_usage": True}, logit_bias={str(eot): -100},
        )
    )  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])
    # errors come back as the SDK's typed exceptions, with OpenAI's code and param
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="Hi", max_tokens=1)
    assert (e.value.code, e.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny",
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
            ],
        )
    assert e.value.param == "messages[0].content[0]" and e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )  # fmt: skip
    assert e.value.param == "tools" and "not supported" in e.value.message


def test_langchain_chat_client(url):
    """What LangChain's ChatOpenAI sends (stream false, n, stream_options when streaming) is all accepted."""
    import langchain_openai as lc

    llm = lc.ChatOpenAI(
        base_url=url + "/v1", api_key="unused", model="tiny", max_tokens=3, n=1, max_retries=0
    )
    reply = llm.invoke([("system", "Be brief."), ("human", "Hi")])
    assert isinstance(reply.content, str) and reply.usage_metadata["output_tokens"] <= 3
    pieces = list(
        lc.ChatOpenAI(
            base_url=url + "/v1", api_key="unused", model="tiny", max_tokens=3, stream_usage=True
        ).stream("Hi")
    )
    assert sum(p.usage_metadata["output_tokens"] for p in pieces if p.usage_metadata) <= 3
    assert any(p.usage_metadata for p in pieces)  # include_usage was asked for and answered
