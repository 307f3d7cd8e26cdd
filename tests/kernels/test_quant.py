"""`--dtype int8`: weight-only int8 layers, and the commands that take it (sample, eval, serve, bench)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from nanogpt.cli import main
from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.infer.evaluate import sliding_window_nll, split_tokens
from nanogpt.infer.generate import generate
from nanogpt.infer.sampling import SamplingParams
from nanogpt.kernels.quant import Int8Embedding, Int8Linear, apply_dtype, quantize_int8
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import load_model
from nanogpt.train.loop import train
from tests.local_server import Server, post
from tests.tiny import quick_train_config, tiny_config

PROMPT = "ROMEO. What light"


@pytest.fixture(scope="module")
def trained(small_data, tmp_path_factory):
    """The tiny model after 150 steps on two works: its next-token distributions have a clear shape."""
    run = tmp_path_factory.mktemp("int8") / "run"
    cfg = quick_train_config(max_iters=150, batch_size=8, learning_rate=3e-3, min_lr=3e-4, eval_interval=150)
    train(tiny_config(context_length=64), cfg, small_data, run, progress=False)
    return run


def test_int8_linear_rounds_each_weight_to_its_rows_grid():
    torch.manual_seed(0)
    lin = nn.Linear(48, 20)
    q = Int8Linear(lin.weight, lin.bias)
    assert q.weight_int8.dtype == torch.int8 and q.scale.dtype == torch.bfloat16
    assert q.weight_int8.abs().max() == 127  # each row's largest weight uses the whole range
    step = q.scale.float()[:, None]
    assert ((q.weight - lin.weight).abs() <= step / 2 + 1e-7).all()  # rounding: half a grid step at most
    x = torch.randn(3, 5, 48)
    y = q(x)
    assert y.shape == (3, 5, 20) and y.dtype == torch.float32
    # the product of bf16-rounded inputs with the int8 grid: close to the same product in fp64
    ref = x.double().to(torch.bfloat16).double() @ q.weight.double().T + lin.bias.double()
    assert torch.allclose(y.double(), ref, rtol=1e-2, atol=1e-2)
    assert (y - lin(x)).abs().max() < 0.05  # and to the fp32 layer (|y| ~ 0.6)


def test_quantize_int8_replaces_every_linear_and_the_tied_head(model):
    fp32 = copy.deepcopy(model)
    q = quantize_int8(model)
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    n_linear = sum(isinstance(m, nn.Linear) for m in fp32.modules())
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == n_linear == 4 * 2 + 1  # 2 blocks + head
    # the tied token table reads the head's int8 rows: one int8 copy for both
    assert isinstance(q.transformer.token_embedding, Int8Embedding)
    assert q.transformer.token_embedding.table[0] is q.lm_head
    idx = torch.tensor([[0, 7, 50256]])
    table = fp32.transformer.token_embedding(idx)
    assert (q.transformer.token_embedding(idx) - table).abs().max() <= q.lm_head.scale.float().max() / 2 + 1e-7
    x = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        a, b = fp32(x), q(x)
    assert (a - b).abs().max() < 0.02 * a.abs().max()
    assert apply_dtype(nn.Sequential(nn.Linear(4, 4)), "bf16") == "bf16"  # only int8 changes a model


@pytest.mark.slow
def test_int8_on_a_trained_model_keeps_greedy_text_and_the_held_out_nll(trained, small_data):
    fp32 = load_model(trained)
    q = quantize_int8(load_model(trained))
    ids = get_tokenizer().encode(PROMPT)
    greedy = SamplingParams(max_tokens=24, temperature=0)
    assert list(generate(q, ids, greedy)) == list(generate(fp32, ids, greedy))
    val = split_tokens(small_data, "val", max_tokens=4000)
    a = sliding_window_nll(fp32, val, context=64, stride=64)
    b = sliding_window_nll(q, val, context=64, stride=64)
    assert a.mean_nll < 9.0  # it is trained (uniform would be 10.8)
    assert abs(a.mean_nll - b.mean_nll) < 0.01


@pytest.mark.slow
def test_sample_and_eval_take_int8(trained, small_data, capsys):
    argv = [
        "sample",
        "--model",
        str(trained),
        "--prompt",
        PROMPT,
        "--temperature",
        "0",
        "--max-new-tokens",
        "16",
    ]
    assert main([*argv, "--dtype", "int8"]) == 0
    int8 = capsys.readouterr().out
    assert main(argv) == 0
    assert int8 == capsys.readouterr().out and int8.startswith(PROMPT)
    scored = []
    for dtype in ("int8", "fp32"):
        ev = ["eval", "--model", str(trained), "--data", str(small_data), "--max-tokens", "3000", "--json"]
        assert main([*ev, "--dtype", dtype]) == 0
        scored.append(json.loads(capsys.readouterr().out)["mean_nll"])
    assert scored[0] != scored[1] and abs(scored[0] - scored[1]) < 0.01  # int8 ran, and costs < 0.01 nats


@pytest.mark.slow
def test_serve_int8_answers_like_fp32(trained, tmp_path):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    texts = []
    for dtype in ("int8", "fp32"):
        server = Server(trained, tmp_path / f"{dtype}.log", dtype=dtype)
        try:
            reply = post(server.url + "/v1/completions", body)
        finally:
            server.stop()
        assert reply.status == 200
        texts.append(reply.body["choices"][0]["text"])
    assert texts[0] == texts[1] and len(texts[0]) > 0
    assert "(int8)" in (tmp_path / "int8.log").read_text()  # the startup line names the dtype


def test_bench_int8_reports_the_ratio_to_bf16_and_the_nll_cost(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--preset", "tiny", "--dtype", "int8", "--batch", "1", "--seq", "32", "--repeats", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    rows = {r["key"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    ratio = rows["decode_int8_over_bf16"]["value"]
    bf16 = rows["decode_bf16_tokens_per_s"]["value"]
    assert ratio == pytest.approx(rows["decode_tokens_per_s"]["value"] / bf16, rel=1e-6)
    assert 0 < rows["low_precision_nll_delta"]["value"] < 0.01
    assert "train_tokens_per_s" not in rows  # int8 is for inference: no training rows
    assert rows["weights_int8_mib"]["value"] < 0.3 * rows["weights_fp32_mib"]["value"]
    capsys.readouterr()
    assert main([*argv, "--peers", "--out", str(tmp_path / "b2")]) == 2
    assert "drop --peers" in capsys.readouterr().err
    assert not (tmp_path / "b2").exists()


def test_training_refuses_int8(small_data, tmp_path, capsys):
    assert (
        main(["train", "--preset", "tiny", "--dtype", "int8", "--data", str(small_data), "--out", "x"]) == 2
    )
    assert "unknown dtype 'int8'; use one of fp32, bf16, fp16" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_untrained_model_logits_survive_int8_within_a_bound():
    torch.manual_seed(3)
    m = NanoGPTLMHeadModel(tiny_config()).eval()
    x = torch.randint(0, 50257, (1, 40))
    with torch.no_grad():
        ref = m(x)
        got = quantize_int8(m)(x)
    assert (got - ref).abs().max() < 0.05
