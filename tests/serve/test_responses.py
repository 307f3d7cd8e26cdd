"""`POST /v1/responses` (OpenAI's Responses API) against a real `nanogpt serve` on 127.0.0.1: the official
`openai` client streamed and not, LangChain's `use_responses_api`, the shapes the client's models declare,
the refusals, the key, a full queue and a client that leaves.

The served model never picks <|endoftext|> (its row is zeroed), so greedy answers run to their token limit
and equal chat's greedy answer for the same messages token for token.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.serve.choices import Choice
from nanogpt.serve.engine import Engine
from nanogpt.serve.responses import Answer, parse_responses
from nanogpt.train.checkpoint import save_model
from tests.local_server import Server, post
from tests.serve.test_http_errors import running
from tests.serve.test_lifecycle import metric, wait_for
from tests.tiny import tiny_config

KEY = "sk-responses-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 3000  # tokens a request would run for if nobody stopped it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(7)
    model = NanoGPTLMHeadModel(tiny_config(context_length=4096))
    with torch.no_grad():  # <|endoftext|> is never the argmax: greedy answers run to their limit
        model.lm_head.weight[50256] = 0.0
    return save_model(tmp_path_factory.mktemp("responses") / "tiny", model)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """One slot and one queue place, so that a full queue is two requests away."""
    s = Server(
        model_dir,
        tmp_path_factory.mktemp("responses_log") / "serve.log",
        key=KEY,
        extra=["--max-batch", "1", "--max-queue", "1"],
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def chat_greedy(client, messages: list[dict], max_tokens: int):
    return client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=max_tokens, temperature=0
    )


def validated(raw: dict):
    """`raw` validated (not merely constructed) as the official client's `Response` model."""
    from openai.types.responses import Response

    return Response.model_validate(raw)


# --- the official client -------------------------------------------------------------------------------------


def test_not_streamed_equals_chat_greedy(client, server):
    resp = client.responses.create(model="tiny", input="The king", max_output_tokens=5, temperature=0)
    chat = chat_greedy(client, [{"role": "user", "content": "The king"}], 5)
    assert resp.output_text == chat.choices[0].message.content and resp.output_text
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == "tiny"
    assert (resp.status, resp.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    (item,) = resp.output
    assert (item.type, item.role, item.status) == ("message", "assistant", "incomplete")
    assert item.id.startswith("msg_") and item.content[0].type == "output_text"
    assert item.content[0].annotations == []
    usage = resp.usage
    assert (usage.input_tokens, usage.output_tokens) == (chat.usage.prompt_tokens, 5)
    assert usage.total_tokens == usage.input_tokens + 5
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    # the echo fields, as the request set them or as OpenAI's defaults
    assert (resp.temperature, resp.top_p, resp.max_output_tokens) == (0.0, 1.0, 5)
    assert (resp.tools, resp.tool_choice, resp.parallel_tool_calls, resp.instructions) == (
        [],
        "auto",
        True,
        None,
    )
    raw = post(
        server.url + "/v1/responses", {"input": "The king", "max_output_tokens": 5, "temperature": 0}, AUTH
    )
    assert raw.status == 200 and validated(raw.body).output_text == resp.output_text


def test_messages_and_instructions_read_as_chat_reads_them(client):
    messages = [
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}, {"type": "input_text", "text": "there"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello", "annotations": []}]},
        {"role": "user", "content": "Who are you?"},
    ]  # fmt: skip
    resp = client.responses.create(
        model="tiny", input=messages, instructions="You are terse.", max_output_tokens=6, temperature=0
    )
    as_chat = [
        {"role": "system", "content": "You are terse."},
        messages[0],
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hello"},
        messages[3],
    ]
    chat = chat_greedy(client, as_chat, 6)
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.instructions == "You are terse."


def test_streamed_events_in_order(client):
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    whole = client.responses.create(model="tiny", input="Once upon", max_output_tokens=7, temperature=0)
    events = list(
        client.responses.create(
            model="tiny", input="Once upon", max_output_tokens=7, temperature=0, stream=True
        )
    )
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 1
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # the limit stopped it: OpenAI ends such a stream with response.incomplete
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    adapter = TypeAdapter(ResponseStreamEvent)
    for e in events:  # every event is what the client's models declare, not merely constructed from it
        adapter.validate_python(e.to_dict())
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-4].text == events[-3].part.text
    assert events[0].response.status == "in_progress" and events[0].response.usage is None
    assert len({e.response.id for e in (events[0], events[1], events[-1])}) == 1
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {events[2].item.id}
    final = events[-1].response
    assert final.status == "incomplete" and final.output_text == text
    assert (final.usage.input_tokens, final.usage.output_tokens) == (whole.usage.input_tokens, 7)


def test_a_finished_answer_is_completed():
    """An answer that ended at <|endoftext|>: status "completed", streamed with response.completed.

    The model's last norm is zeroed and the end-of-text row points along its bias, so every answer ends
    at once: the "stop" path, through the same app the server runs (here in this process).
    """
    import openai

    torch.manual_seed(1)
    model = NanoGPTLMHeadModel(tiny_config(context_length=64))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()  # every position's last hidden state is the bias
        bias = model.transformer.ln_f.bias
        bias.copy_(torch.randn_like(bias))
        model.lm_head.weight[50256] = 100.0 * bias / bias.norm()
    from nanogpt.serve.app import create_app

    with running(create_app(Engine(model, "tiny"))) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        resp = c.responses.create(model="tiny", input="Hi")
        assert (resp.status, resp.incomplete_details, resp.output_text) == ("completed", None, "")
        assert resp.output[0].status == "completed" and resp.usage.output_tokens == 0
        assert resp.completed_at is not None and resp.max_output_tokens is None
        kinds = [e.type for e in c.responses.create(model="tiny", input="Hi", stream=True)]
        assert "response.output_text.delta" not in kinds and kinds[-1] == "response.completed"
        assert kinds[-4:-1] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
        ]


def test_a_job_that_fails_mid_stream_ends_it_with_response_failed(model_dir):
    """The server shuts down under a stream: the stream ends with response.failed, whose error says why."""
    import openai

    from nanogpt.serve.app import create_app
    from nanogpt.train.checkpoint import load_model

    engine = Engine(load_model(model_dir), "tiny")
    with running(create_app(engine)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        events = []
        for e in c.responses.create(model="tiny", input="Go", max_output_tokens=LONG, stream=True):
            events.append(e)
            if [x.type for x in events].count("response.output_text.delta") == 3:
                engine.close(0.0, wait=False)  # what a shutdown past its drain does to running jobs
    last = events[-1]
    assert last.type == "response.failed" and last.sequence_number == len(events) - 1
    assert last.response.status == "failed" and last.response.error.code == "server_error"
    assert last.response.error.message == "the server shut down"
    assert last.response.output[0].status == "incomplete"
    assert "response.completed" not in {e.type for e in events}


def test_response_object_validates_as_the_clients_model():
    """Each state of the response object validates as `openai.types.responses.Response`."""
    tok = get_tokenizer()
    rr = parse_responses(
        {"input": "Hi", "instructions": "Be brief.", "metadata": {"k": "v"}}, tok, vocab_size=50257
    )
    choice = Choice(0, rr.request, tok)
    choice.text, choice.n_tokens, choice.finish = "Hello", 1, "stop"
    answer = Answer(rr, "tiny", choice)
    done = validated(answer.response("completed", [answer.item("completed")]))
    assert done.output_text == "Hello" and done.metadata == {"k": "v"} and done.usage.total_tokens > 1
    assert validated(answer.response("in_progress", [])).usage is None
    failed = validated(answer.response("failed", [answer.item("incomplete")], error="the server shut down"))
    assert (failed.error.code, failed.error.message) == ("server_error", "the server shut down")


# --- LangChain ---------------------------------------------------------------------------------------------


def test_langchain_use_responses_api(client, server):
    import langchain_openai as lc

    llm = lc.ChatOpenAI(
        base_url=server.url + "/v1",
        api_key=KEY,
        model="tiny",
        use_responses_api=True,
        max_tokens=4,
        temperature=0,
        max_retries=0,
    )
    reply = llm.invoke([("system", "Be brief."), ("human", "Hi")])
    chat = chat_greedy(
        client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], 4
    )
    assert reply.text == chat.choices[0].message.content
    assert reply.usage_metadata["output_tokens"] == 4
    pieces = list(llm.stream("Hi"))
    streamed = "".join(p.text for p in pieces)
    assert streamed == chat_greedy(client, [{"role": "user", "content": "Hi"}], 4).choices[0].message.content
    assert any(p.usage_metadata for p in pieces)


# --- refusals, the key, the queue, a client that leaves ----------------------------------------------------------

REFUSED = [
    ("tools", [{"type": "function", "name": "f", "parameters": {}}], "not supported"),
    ("previous_response_id", "resp_123", "keeps no responses"),
    ("store", True, "stored responses are not kept"),
    ("background", True, "not supported"),
    ("conversation", "conv_1", "keeps no conversations"),
    ("text", {"format": {"type": "json_object"}}, "not supported"),
    ("reasoning", {"effort": "high"}, "not supported"),
    ("include", ["message.output_text.logprobs"], "not supported"),
    ("truncation", "auto", "not supported"),
    ("top_logprobs", 3, "not supported"),
    ("seed", 1, "not a field of /v1/responses"),
    ("max_output_tokens", 0, "out of range"),
    ("temperature", float("nan"), "must be a finite number"),
    ("instructions", 7, "must be a string"),
]


@pytest.mark.parametrize("field, value, says", REFUSED, ids=[f for f, _, _ in REFUSED])
def test_unsupported_field_is_a_400_naming_it(server, field, value, says):
    reply = post(server.url + "/v1/responses", {"input": "Hi", field: value}, AUTH)
    assert reply.status == 400, reply
    error = reply.body["error"]
    assert error["param"] == field and f"'{field}'" in error["message"] and says in error["message"], error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "value, param, says",
    [
        ([], "input", "non-empty list"),
        ([{"type": "function_call_output", "call_id": "c", "output": "x"}], "input[0].type", "messages only"),
        ([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}], "input[0].content[0]", "'input_image' part"),
        ([{"role": "user", "content": [{"type": "output_text", "text": "x"}]}], "input[0].content[0]", "input_text parts only"),
        ([{"role": "tool", "content": "x"}], "input[0].role", "must be one of"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_naming_its_place(server, value, param, says):
    reply = post(server.url + "/v1/responses", {"input": value}, AUTH)
    assert reply.status == 400 and reply.body["error"]["param"] == param, reply
    assert says in reply.body["error"]["message"]


def test_key_model_and_context(server):
    import openai

    anonymous = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.responses.create(model="tiny", input="Hi")
    reply = post(server.url + "/v1/responses", {"model": "gpt-4o", "input": "Hi"}, AUTH)
    assert reply.status == 404 and reply.body["error"]["code"] == "model_not_found"
    reply = post(server.url + "/v1/responses", {"input": "to be or not " * 2000}, AUTH)
    assert reply.status == 400 and reply.body["error"]["code"] == "context_length_exceeded"
    assert reply.body["error"]["param"] == "input"


def open_stream(server: Server) -> socket.socket:
    """A streamed /v1/responses request that would run for LONG tokens; returns once it is generating."""
    body = json.dumps({"input": "Go", "max_output_tokens": LONG, "temperature": 0, "stream": True}).encode()
    head = (
        f"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(head.encode() + body)
    seen = b""
    while seen.count(b"response.output_text.delta") < 4:  # the type is in the event line and its data
        more = sock.recv(65536)
        assert more, seen
        seen += more
    return sock


def test_full_queue_is_429_and_a_client_that_leaves_cancels_its_job(server):
    import openai

    running_sock = open_stream(server)  # the one slot
    waiting = socket.create_connection(("127.0.0.1", server.port), timeout=30)  # the one queue place
    body = json.dumps({"input": "Wait", "max_output_tokens": LONG}).encode()
    waiting.sendall(
        f"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    try:
        assert wait_for(lambda: metric(server.url, "nanogpt_queue_depth") == 1)
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            c.responses.create(model="tiny", input="Hi", max_output_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
    finally:
        waiting.close()
        running_sock.close()
    # both clients left: their jobs are cancelled, not run to LONG tokens
    assert wait_for(lambda: metric(server.url, "nanogpt_active_sequences") == 0)
    assert wait_for(lambda: metric(server.url, "nanogpt_queue_depth") == 0)
    assert metric(server.url, "nanogpt_generated_tokens_total") < LONG

    def left() -> int:  # the log line of each abandoned request follows its cancellation
        return sum("POST /v1/responses 499" in line for line in server.log.read_text().splitlines())

    assert wait_for(lambda: left() == 2), server.log.read_text()[-2000:]


def test_input_and_instructions_make_the_prompt_chat_makes():
    """The one formatter: `instructions` first as a system message, then each input message, as chat reads them."""
    from nanogpt.serve.requests import parse_request

    tok = get_tokenizer()
    rr = parse_responses(
        {"instructions": "Be brief.", "input": [{"type": "message", "role": "user", "content": "Hi"}]},
        tok,
        vocab_size=50257,
    )
    chat = parse_request(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        tok,
        chat=True,
        vocab_size=50257,
    )
    assert rr.request.prompts == chat.prompts
    assert (
        tok.decode(rr.request.prompts[0])
        == "System:\nBe brief.<|endoftext|>User:\nHi<|endoftext|>Assistant:\n"
    )
    assert parse_responses({"input": "Hi"}, tok, vocab_size=50257).request.prompts == [
        tok.encode_with_eot("User:\nHi<|endoftext|>Assistant:\n")
    ]
