"""The playground's server side: the page at `/`, `POST /v1/nanogpt/attention` and `GET /v1/nanogpt/run`, on a
real `nanogpt serve` of a tiny trained run (fp32 with an API key, bf16, int8, a bare checkpoint)."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import load_model, save_model
from nanogpt.train.loop import train
from nanogpt.train.plot import read_log
from tests.local_server import Server, post
from tests.tiny import quick_train_config, tiny_config

KEY = "sk-playground-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


def train_tiny_run(data: Path, out: Path, context_length: int = 64) -> Path:
    """The tiny model after 12 steps with 3 held-out evaluations: a run folder with log.jsonl and best/."""
    cfg = quick_train_config(max_iters=12, eval_interval=4)
    train(tiny_config(context_length=context_length), cfg, data, out, progress=False)
    return out


@pytest.fixture(scope="module")
def run(small_data, tmp_path_factory) -> Path:
    return train_tiny_run(small_data, tmp_path_factory.mktemp("playground") / "run")


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    s = Server(run, tmp_path_factory.mktemp("playground_log") / "serve.log", key=KEY)
    yield s
    s.stop()


def get(url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def check_maps(body: dict, text: str, layers: int, heads: int, atol: float = 1e-4) -> None:
    tok = get_tokenizer()
    ids = tok.encode(text)
    assert body["ids"] == ids and "".join(body["tokens"]) == text
    assert (body["layers"], body["heads"]) == (layers, heads)
    w = torch.tensor(body["attention"])
    T = len(ids)
    assert w.shape == (layers, heads, T, T)
    torch.testing.assert_close(w.sum(-1), torch.ones(layers, heads, T), atol=atol, rtol=0)
    assert (w.triu(diagonal=1) == 0).all() and (w >= 0).all()


def test_the_page_is_served_without_a_key_and_loads_nothing_from_elsewhere(server):
    status, html, headers = get(server.url + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"nanogpt playground" in html
    assert "default-src 'self'" in headers["content-security-policy"]  # the browser fetches nothing else
    for name in ("main.js", "generate.js", "attention.js", "story.js", "charts.js", "sampling.js", "api.js"):
        status, js, headers = get(f"{server.url}/static/{name}")
        assert status == 200 and headers["content-type"].startswith("text/javascript")
        assert b"http://" not in js.replace(b"http://www.w3.org/2000/svg", b"") and b"https://" not in js
    assert get(server.url + "/static/style.css")[0] == 200
    assert get(server.url + "/static/nope.js")[0] == 404
    assert get(server.url + "/static/..%2Fapp.py")[0] == 404  # only the page's own files


def test_the_endpoints_need_the_key(server):
    assert get(server.url + "/v1/nanogpt/run")[0] == 401
    assert post(server.url + "/v1/nanogpt/attention", {"prompt": "Hi"}).status == 401
    assert KEY not in server.log.read_text()


def test_run_story(server, run):
    status, raw, _ = get(server.url + "/v1/nanogpt/run", AUTH)
    assert status == 200
    story = json.loads(raw)
    cfg = load_model(run).config
    assert story["model"] == "tiny" and story["dtype"] == "fp32" and story["config"] == cfg.to_dict()
    m = NanoGPTLMHeadModel(cfg)  # the counts `nanogpt info` prints
    assert story["parameters"] == {"unique": m.num_params(True), "counted_twice": m.num_params(False)}
    log = read_log(run / "log.jsonl")
    assert [p["step"] for p in story["loss_curve"]] == [r["step"] for r in log]
    evals = [r for r in log if "val_loss" in r]
    assert [p["val_loss"] for p in story["loss_curve"] if p["val_loss"] is not None] == [
        r["val_loss"] for r in evals
    ]
    best = min(evals, key=lambda r: r["val_loss"])  # serve loads best/: the lowest held-out loss
    assert story["held_out"]["step"] == best["step"]
    assert story["held_out"]["perplexity"] == pytest.approx(math.exp(best["val_loss"]))
    assert [s["name"] for s in story["lineage"]] == ["train"] and story["lineage"][0]["iterations"] == 12
    assert story["defaults"]["temperature"] == 1.0 and story["defaults"]["max_tokens"] == 16


def test_attention_of_a_prompt(server):
    text = "ROMEO. What light through yonder window breaks?"
    status, body = post(server.url + "/v1/nanogpt/attention", {"prompt": text}, AUTH)
    assert status == 200
    check_maps(body, text, layers=2, heads=4)
    ids = get_tokenizer().encode(text)
    status, by_ids = post(server.url + "/v1/nanogpt/attention", {"prompt": ids, "model": "tiny"}, AUTH)
    assert status == 200 and by_ids["attention"] == body["attention"]
    # the whole context in one request (the engine reads it a prefill chunk at a time)
    status, full = post(server.url + "/v1/nanogpt/attention", {"prompt": list(range(100, 164))}, AUTH)
    assert status == 200 and len(full["attention"][0][0]) == 64
    metrics = get(server.url + "/metrics")[1].decode()
    assert 'nanogpt_requests_total{path="/v1/nanogpt/attention",status="200"}' in metrics


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({}, "'prompt'"),
        ({"prompt": 3}, "'prompt'"),
        ({"prompt": ["a", "b"]}, "one prompt"),
        ({"prompt": [[1, 2]]}, "one prompt"),
        ({"prompt": "hi", "layer": 1}, "unknown field 'layer'"),
        ({"prompt": list(range(65))}, "context is 64"),
        ({"prompt": [-1]}, "token ids"),
    ],
)
def test_attention_refuses_bad_requests_with_a_400_naming_the_problem(server, body, says):
    status, answer = post(server.url + "/v1/nanogpt/attention", body, AUTH)
    assert status == 400 and says in answer["error"]["message"]


def test_another_model_is_a_404(server):
    status, answer = post(server.url + "/v1/nanogpt/attention", {"prompt": "hi", "model": "gpt-4"}, AUTH)
    assert status == 404 and answer["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_every_precision_serve_loads(run, tmp_path, dtype):
    s = Server(run, tmp_path / "serve.log", dtype=dtype)
    try:
        status, body = post(s.url + "/v1/nanogpt/attention", {"prompt": "To be, or not to be"})
        assert status == 200
        check_maps(body, "To be, or not to be", layers=2, heads=4, atol=1e-4)
        story = json.loads(get(s.url + "/v1/nanogpt/run")[1])
        assert story["dtype"] == dtype
        assert story["parameters"]["unique"] == NanoGPTLMHeadModel(tiny_config()).num_params(True)
    finally:
        s.stop()


def test_a_bare_checkpoint_and_a_full_queue(tmp_path):
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "ckpt", NanoGPTLMHeadModel(tiny_config(context_length=32)))
    s = Server(ckpt, tmp_path / "serve.log", extra=["--max-queue", "0"])
    try:
        story = json.loads(get(s.url + "/v1/nanogpt/run")[1])
        assert story["config"]["context_length"] == 32
        assert story["lineage"] is None and story["held_out"] is None and story["loss_curve"] is None
        # an attention request is a job like any other: a full queue answers 429 with Retry-After
        status, answer = post(s.url + "/v1/nanogpt/attention", {"prompt": "hi"})
        assert status == 429 and answer["error"]["code"] == "rate_limit_exceeded"
    finally:
        s.stop()
