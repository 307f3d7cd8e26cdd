"""`nanogpt serve` as a real subprocess on 127.0.0.1, and as the teacher of real distillation runs."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from nanogpt.commands.distill import main as distill_main  # noqa: E402
from nanogpt.data.tokenizer import get_tokenizer  # noqa: E402
from nanogpt.distill.api import (  # noqa: E402
    ApiClient,
    ApiConfig,
    TeacherError,
    parse_topk,
    retry_after_seconds,
    token_id_of,
)
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.kernels.device import cpu_flags, emulated_bf16_warning  # noqa: E402
from nanogpt.model.gpt import NanoGPTLMHeadModel  # noqa: E402
from nanogpt.serve.requests import BadRequest, chat_prompt, parse_prompts, parse_request  # noqa: E402
from nanogpt.train.checkpoint import save_model  # noqa: E402
from tests.local_server import KEY_ENV, Server, free_port, post  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve_model")
    cfg = tiny_config(context_length=32)
    torch.manual_seed(3)
    return save_model(root / "tiny", NanoGPTLMHeadModel(cfg))


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    s = Server(tiny_model, tmp_path_factory.mktemp("serve_log") / "serve.log", key="sk-test-secret")
    yield s
    s.stop()


AUTH = {"Authorization": "Bearer sk-test-secret"}


# --- pure request parsing ---------------------------------------------------------------------------------


def test_parse_prompts_and_sampling():
    tok = get_tokenizer()
    assert parse_prompts("Hello world", tok) == [[15496, 995]]
    assert parse_prompts([1, 2, 3], tok) == [[1, 2, 3]]
    assert parse_prompts(["a", [5, 6]], tok) == [tok.encode("a"), [5, 6]]
    for bad in (None, [], [1, "a"], [-1], {"x": 1}):
        with pytest.raises(BadRequest):
            parse_prompts(bad, tok)

    def parse(body: dict):
        return parse_request({"prompt": "Hi", **body}, tok, chat=False, vocab_size=tok.vocab_size)

    o = parse({"max_tokens": 0, "logprobs": 5, "echo": True, "stop": "\n"})
    assert (o.sampling.max_tokens, o.logprobs, o.echo, o.sampling.stop) == (0, 5, True, ("\n",))
    # OpenAI's defaults, not the CLI's: temperature 1, no top-k, 16 tokens
    d = parse({}).sampling
    assert (d.max_tokens, d.temperature, d.top_k, d.top_p, d.seed) == (16, 1.0, None, 1.0, None)
    for bad in ({"max_tokens": -1}, {"temperature": "hot"}, {"logprobs": 1000}, {"n": 0}, {"stop": 3}):
        with pytest.raises(BadRequest):
            parse(bad)
    # the chat template fine-tuning trains on (nanogpt.data.chat), not a serve-only format
    ids = chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert get_tokenizer().decode(ids) == "System:\nBe brief.<|endoftext|>User:\nHi<|endoftext|>Assistant:\n"


def test_token_mapping_and_retry_after():
    tok = get_tokenizer()
    assert token_id_of(" world", tok) == 995 and token_id_of("token_id:7", tok) == 7
    assert token_id_of("\ufffd", tok) is None
    with pytest.raises(TeacherError, match="another tokenizer"):
        token_id_of(" the cat", tok)  # two GPT-2 tokens: an o200k-style merged token
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds(None) is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    with pytest.raises(TeacherError, match="no prompt logprobs"):
        parse_topk({"choices": [{"text": ""}]}, [1, 2], 3, tok)


# --- the real server ------------------------------------------------------------------------------------------


def test_models_auth_and_errors(server):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url + "/v1/models", timeout=10)
    assert e.value.code == 401
    assert json.loads(e.value.read())["error"]["code"] == "invalid_api_key"
    req = urllib.request.Request(server.url + "/v1/models", headers=AUTH)
    models = json.loads(urllib.request.urlopen(req, timeout=10).read())
    assert models["data"][0]["id"] == "tiny"
    url = server.url + "/v1/completions"
    assert post(url, None, AUTH, raw=b"{not json").status == 400
    assert post(url, [1, 2], AUTH).status == 400
    status, body = post(url, {"prompt": "hi", "max_tokens": "many"}, AUTH)
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, body = post(url, {"prompt": list(range(40)), "max_tokens": 1}, AUTH)
    assert status == 400 and "context" in body["error"]["message"]
    assert post(server.url + "/v1/chat/completions", {"messages": "hi"}, AUTH).status == 400
    assert "sk-test-secret" not in server.log.read_text()  # the key is never logged


def test_completions_generate_and_echo_logprobs(server):
    url = server.url + "/v1/completions"
    status, body = post(url, {"prompt": "The king", "max_tokens": 5, "temperature": 0, "logprobs": 3}, AUTH)
    assert status == 200
    c = body["choices"][0]
    assert len(c["logprobs"]["tokens"]) == 5 == body["usage"]["completion_tokens"]
    assert all(len(t) == 3 for t in c["logprobs"]["top_logprobs"])
    # greedy: the chosen token is the most likely one
    assert c["logprobs"]["token_logprobs"][0] == pytest.approx(
        max(c["logprobs"]["top_logprobs"][0].values()), abs=1e-5
    )
    # scoring a prompt: echo + max_tokens 0 + logprobs k, ids in and out
    ids = get_tokenizer().encode("To be, or not to be")
    status, body = post(
        url,
        {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 4, "return_tokens_as_token_ids": True},
        AUTH,
    )
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == [f"token_id:{i}" for i in ids]
    assert lp["top_logprobs"][0] is None and all(len(t) == 4 for t in lp["top_logprobs"][1:])
    k = parse_topk(body, ids, 4, get_tokenizer())
    assert k.ids.shape == (len(ids) - 1, 4) and bool(k.valid.all())
    assert (k.logprobs <= 0).all()


def test_bf16_server_decodes_and_scores_as_the_library_does(tiny_model, tmp_path):
    from nanogpt.infer.generate import decode_steps
    from nanogpt.infer.sampling import SamplingParams
    from nanogpt.train.checkpoint import load_model

    ids = get_tokenizer().encode("The king")
    srv = Server(tiny_model, tmp_path / "serve.log", dtype="bf16")
    try:
        body = {"prompt": ids, "max_tokens": 6, "temperature": 0, "return_tokens_as_token_ids": True}
        status, out = post(srv.url + "/v1/completions", {**body, "logprobs": 1})
        score = {
            "prompt": ids,
            "max_tokens": 0,
            "echo": True,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
        }
        _, scored = post(srv.url + "/v1/completions", score)
    finally:
        srv.stop()
    log = (tmp_path / "serve.log").read_text()
    assert status == 200 and "(bf16)" in log
    # the emulated-bf16 warning exactly where this CPU lacks the instructions (x86-64 Linux reads its flags)
    expected = emulated_bf16_warning(torch.device("cpu"), "bf16", cpu_flags())
    assert (expected is not None and f"nanogpt serve: {expected}" in log) or (
        expected is None and "emulated" not in log
    )
    got = [int(t.split(":")[1]) for t in out["choices"][0]["logprobs"]["tokens"]]
    model = load_model(tiny_model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs
    try:
        want = [
            t for t, _ in decode_steps(model, ids, SamplingParams(max_tokens=6, temperature=0), dtype="bf16")
        ]
        with torch.inference_mode():
            fp32 = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    finally:
        torch.set_num_threads(threads)
    assert got == want
    served = scored["choices"][0]["logprobs"]["token_logprobs"][1]
    assert served == pytest.approx(float(logp[0, ids[1]]), abs=1e-5)  # scoring runs in bf16 too
    assert served != pytest.approx(float(fp32[0, ids[1]]), abs=1e-6)


def test_chat_and_stream(server):
    status, body = post(
        server.url + "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "seed": 1},
        AUTH,
    )
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    req = urllib.request.Request(
        server.url + "/v1/completions",
        data=json.dumps({"prompt": "Once", "max_tokens": 6, "stream": True, "seed": 2}).encode(),
        headers={"Content-Type": "application/json", **AUTH},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    # the streamed text equals the non-streamed text for the same seed
    _, full = post(server.url + "/v1/completions", {"prompt": "Once", "max_tokens": 6, "seed": 2}, AUTH)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]


# --- the server as a teacher -----------------------------------------------------------------------------


def kd_args(student: Path, data: Path, out: Path, teacher: str, *extra: str) -> list[str]:
    return [
        "--student", str(student), "--data", str(data), "--out", str(out), "--teacher", teacher,
        "--batch-size", "2", "--eval-iters", "1", "--eval-interval", "2", "--device", "cpu",
        "--no-progress", "--learning-rate", "1e-3", "--api-key-env", KEY_ENV, "--retries", "1",
        "--timeout", "10", *extra,
    ]  # fmt: skip


def test_token_level_teacher_cache_and_restart(tiny_model, student, small_data, tmp_path, monkeypatch):
    """Top-k KD through a real server; resume hits the cache; a killed teacher leaves the run resumable."""
    monkeypatch.setenv(KEY_ENV, "sk-kd")
    log = tmp_path / "serve.log"
    srv = Server(tiny_model, log, key="sk-kd")
    out = tmp_path / "kd"
    spec = f"completions:tiny@{srv.url}/v1"
    try:
        assert distill_main(kd_args(student, small_data, out, spec, "--max-iters", "2", "--top-k", "5")) == 0
        assert srv.requests() == 4  # 2 steps x batch 2, one scoring request per window
        srv.stop()
        # the teacher is down: the run stops with one line, its checkpoint intact
        with pytest.raises(UserError, match="failed after 2 tries"):
            distill_main(
                kd_args(student, small_data, out, spec, "--max-iters", "4", "--top-k", "5", "--resume")
            )
        assert json.loads((out / "last" / "state.json").read_text())["step"] == 2
        srv = Server(tiny_model, log, port=srv.port, key="sk-kd")  # restarted on the same port
        before = srv.requests()
        assert (
            distill_main(
                kd_args(student, small_data, out, spec, "--max-iters", "4", "--top-k", "5", "--resume")
            )
            == 0
        )
        assert json.loads((out / "last" / "state.json").read_text())["step"] == 4
        assert srv.requests() - before == 4  # steps 3-4 only: steps 1-2 were never re-sent
        # a replay of the whole run from scratch costs nothing: every answer is in the cache
        before = srv.requests()
        args = kd_args(student, small_data, tmp_path / "kd2", spec, "--max-iters", "4", "--top-k", "5")
        assert distill_main([*args, "--cache-dir", str(tmp_path / "kd.teacher")]) == 0
        assert srv.requests() == before
        hist = [
            json.loads(x) for x in (tmp_path / "kd.teacher" / "distill_log.jsonl").read_text().splitlines()
        ]
        assert all(h["soft"] >= 0 for h in hist) and len(hist) == 4 + 4
    finally:
        srv.stop()


def test_bad_teacher_answers_raise_or_are_skipped(tmp_path, student, small_data, server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "wrong-key")
    spec = f"completions:tiny@{server.url}/v1"
    with pytest.raises(UserError, match="HTTP 401"):
        distill_main(kd_args(student, small_data, tmp_path / "a", spec, "--max-iters", "1"))
    # --skip-bad: every answer is bad, the run goes on with the hard loss alone and counts the skips
    assert (
        distill_main(kd_args(student, small_data, tmp_path / "b", spec, "--max-iters", "1", "--skip-bad"))
        == 0
    )
    hist = [json.loads(x) for x in (tmp_path / "b.teacher" / "distill_log.jsonl").read_text().splitlines()]
    assert hist[-1]["skipped"] == 2 and hist[-1]["soft"] == 0.0
    # unreachable: a closed port, one retry, a one-line error
    client = ApiClient(
        ApiConfig(f"http://127.0.0.1:{free_port()}/v1", "m", retries=1, backoff=0.01, timeout=2)
    )
    with pytest.raises(TeacherError, match="failed after 2 tries"):
        client.post("/completions", {"prompt": [1]})


def test_sequence_level_chat_teacher(student, small_data, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-chat")
    cfg = tiny_config()  # context 64
    teacher = save_model(tmp_path / "chat_teacher", NanoGPTLMHeadModel(cfg))  # room for the instruction
    srv = Server(teacher, tmp_path / "serve.log", key="sk-chat")
    try:
        spec = f"chat:tiny@{srv.url}/v1"
        extra = ["--max-iters", "2", "--prompts", "6", "--prompt-tokens", "16", "--reply-tokens", "12"]
        assert distill_main(kd_args(student, small_data, tmp_path / "seq", spec, *extra)) == 0
        assert srv.requests("/v1/chat/completions") == 6
        rows = [
            json.loads(x)
            for x in (tmp_path / "seq.teacher" / "chat_data" / "replies.jsonl").read_text().splitlines()
        ]
        assert len(rows) == 6 and all(r["model"] == "tiny" and r["prompt"] and r["reply"] for r in rows)
        assert (
            distill_main(kd_args(student, small_data, tmp_path / "seq", spec, "--max-iters", "3", "--resume"))
            == 0
        )
        assert srv.requests("/v1/chat/completions") == 6  # resumed: the replies came from the cache
    finally:
        srv.stop()
