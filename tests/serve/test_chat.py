"""Chat in the one template everywhere it is spoken here: `sample --chat` (one turn, and a conversation on
stdin) and `serve`'s /v1/chat/completions through the openai client; each reply equals greedy generation
from `data.chat.prompt_ids` of the same messages."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from nanogpt import cli
from nanogpt.data.chat import prompt_ids
from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.infer.generate import generate
from nanogpt.infer.sampling import SamplingParams
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import load_model, save_model
from tests.local_server import Server
from tests.tiny import tiny_config

TOK = get_tokenizer()
NEW = 6
GREEDY = ["--temperature", "0", "--max-new-tokens", str(NEW), "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    return save_model(tmp_path_factory.mktemp("chat_model") / "tiny", NanoGPTLMHeadModel(tiny_config()))


def greedy_reply(model_dir: Path, messages: list[dict[str, str]]) -> str:
    model = load_model(model_dir, device=torch.device("cpu"))
    ids = list(generate(model, prompt_ids(messages), SamplingParams(max_tokens=NEW, temperature=0.0)))
    return TOK.decode(ids)


def test_sample_chat_one_turn(capsys, tiny_model):
    argv = ["sample", "--model", str(tiny_model), "--chat", "Hi there", "--system", "Be brief.", *GREEDY]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    expected = greedy_reply(
        tiny_model, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    )
    assert out == expected + "\n"


def test_sample_chat_conversation_on_stdin(capsys, monkeypatch, tiny_model):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n\nAnd then?\n/quit\nnot read\n"))
    assert cli.main(["sample", "--model", str(tiny_model), "--chat", *GREEDY]) == 0
    captured = capsys.readouterr()
    first = greedy_reply(tiny_model, [{"role": "user", "content": "Hi"}])
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first}]
    second = greedy_reply(tiny_model, [*history, {"role": "user", "content": "And then?"}])
    assert first and captured.out == f"{first}\n{second}\n"  # the second turn saw the first reply
    assert captured.err.count("[reply]") == 2


def test_serve_chat_completions_use_the_template(tiny_model, tmp_path):
    openai = pytest.importorskip("openai")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    server = Server(tiny_model, tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=NEW)
    finally:
        server.stop()
    assert r.choices[0].message.content == greedy_reply(tiny_model, messages)
    assert r.usage.prompt_tokens == len(prompt_ids(messages))
