"""Sliding-window evaluation against direct computations written out here, and the `nanogpt eval` command."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanogpt.commands import eval as eval_command
from nanogpt.data.shards import TokenData
from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.errors import UserError
from nanogpt.infer.evaluate import (
    bits_per_byte,
    iter_windows,
    perplexity,
    sliding_window_nll,
    split_tokens,
    text_tokens,
)
from nanogpt.model.gpt import NanoGPTLMHeadModel

TEXT = (
    "Now is the winter of our discontent made glorious summer by this sun of York; "
    "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. "
    "Café, naïve, 東京 — bytes beyond ASCII count too."
)


def real_tokens(n: int) -> torch.Tensor:
    ids = get_tokenizer().encode(TEXT * 10)
    assert len(ids) >= n
    return torch.tensor(ids[:n])


def nll_sum(model: NanoGPTLMHeadModel, x: torch.Tensor, y: torch.Tensor) -> float:
    """Total NLL of targets y (T,) given inputs x (T,), one plain forward."""
    with torch.no_grad():
        logits = model(x[None])[0].float()
    return F.cross_entropy(logits, y, reduction="sum").item()


@pytest.mark.parametrize("n,context,stride", [(2, 4, 4), (10, 4, 4), (10, 4, 1), (11, 4, 3), (100, 16, 5)])
def test_windows_score_every_target_once(n, context, stride):
    scored = []
    for i, w in enumerate(iter_windows(n, context, stride)):
        assert 1 <= w.scored <= w.length <= context
        assert w.start + w.length <= n - 1  # its targets exist
        if i:  # after the first window every scored target has at least context - stride tokens of history
            assert w.length - w.scored >= min(context - stride, w.start + w.length - w.scored)
        scored += range(w.start + w.length - w.scored + 1, w.start + w.length + 1)
    assert scored == list(range(1, n))


def test_windows_reject_bad_stride():
    with pytest.raises(ValueError):
        list(iter_windows(10, 4, 0))
    with pytest.raises(ValueError):
        list(iter_windows(10, 4, 5))


def test_single_window_equals_one_forward(model):
    tokens = real_tokens(40)  # fits in the model's 64-token context
    r = sliding_window_nll(model, tokens)
    direct = nll_sum(model, tokens[:-1], tokens[1:]) / 39
    assert r.tokens_scored == 39
    assert r.mean_nll == pytest.approx(direct, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(direct), rel=1e-5)


def test_stride_one_equals_plain_loop_over_positions(model):
    tokens, context = real_tokens(60), 12
    total = 0.0
    for t in range(1, len(tokens)):  # target t sees the min(t, context) tokens before it
        ctx = tokens[max(0, t - context) : t]
        with torch.no_grad():
            logits = model(ctx[None])[0, -1]
        total += F.cross_entropy(logits[None], tokens[t : t + 1]).item()
    r = sliding_window_nll(model, tokens, context=context, stride=1, batch_size=5)
    assert r.tokens_scored == 59
    assert r.mean_nll == pytest.approx(total / 59, rel=1e-5)


def test_stride_context_equals_independent_chunks(model):
    tokens, context = real_tokens(150), 32
    total = 0.0
    for s in range(0, len(tokens) - 1, context):  # chunks x = tokens[s:s+C], y = the next C tokens
        x = tokens[s : min(s + context, len(tokens) - 1)]
        total += nll_sum(model, x, tokens[s + 1 : s + 1 + len(x)])
    r = sliding_window_nll(model, tokens, context=context, stride=context, batch_size=3)
    assert r.tokens_scored == 149
    assert r.mean_nll == pytest.approx(total / 149, rel=1e-5)
    # the default stride is the context, and the default context is the model's
    assert sliding_window_nll(model, tokens).mean_nll == pytest.approx(
        sliding_window_nll(model, tokens, context=64, stride=64).mean_nll, rel=1e-6
    )


def test_smaller_stride_differs_but_covers_every_token(model):
    tokens = real_tokens(150)
    full = sliding_window_nll(model, tokens, context=32)
    overlap = sliding_window_nll(model, tokens, context=32, stride=8)
    assert full.tokens_scored == overlap.tokens_scored == 149
    assert full.n_bytes == overlap.n_bytes
    assert not math.isclose(full.mean_nll, overlap.mean_nll, rel_tol=1e-6)


def test_batch_size_does_not_change_the_result(model):
    tokens = real_tokens(130)
    a = sliding_window_nll(model, tokens, context=16, stride=6, batch_size=1)
    b = sliding_window_nll(model, tokens, context=16, stride=6, batch_size=7)
    assert a.mean_nll == pytest.approx(b.mean_nll, rel=1e-5)


def test_bits_per_byte_by_hand(model):
    tokens = real_tokens(120)
    r = sliding_window_nll(model, tokens, context=32, stride=16)
    n_bytes = len(get_tokenizer().decode_bytes(tokens[1:].tolist()))
    assert r.n_bytes == n_bytes > r.tokens_scored  # multi-byte characters: more bytes than tokens
    assert r.bits_per_byte == pytest.approx(r.mean_nll * r.tokens_scored / math.log(2) / n_bytes, rel=1e-9)
    assert bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)


def test_bf16_close_to_fp32_and_mode_restored(model):
    tokens = real_tokens(100)
    model.train()
    fp32 = sliding_window_nll(model, tokens, context=32)
    assert model.training  # eval mode only for the duration of the call
    bf16 = sliding_window_nll(model, tokens, context=32, dtype="bf16")
    assert bf16.mean_nll == pytest.approx(fp32.mean_nll, rel=2e-2)


def test_bad_settings(model):
    tokens = real_tokens(50)
    with pytest.raises(UserError, match="--stride 0"):
        sliding_window_nll(model, tokens, stride=0)
    with pytest.raises(UserError, match="--stride 65"):
        sliding_window_nll(model, tokens, stride=65)
    with pytest.raises(UserError, match="--context 65"):
        sliding_window_nll(model, tokens, context=65)
    with pytest.raises(UserError, match="at least 2"):
        sliding_window_nll(model, tokens[:1])
    with pytest.raises(UserError, match="unknown dtype"):
        sliding_window_nll(model, tokens, dtype="fp8")


def test_split_tokens_concatenates_and_caps(small_data):
    shards = TokenData(small_data).split("val")
    assert split_tokens(small_data, "val").tolist() == [int(t) for s in shards for t in s]
    assert split_tokens(small_data, "val", max_tokens=1000).tolist() == [int(t) for t in shards[0][:1000]]


def test_text_tokens_joins_jsonl_documents(tmp_path):
    tok = get_tokenizer()
    p = tmp_path / "docs.jsonl"
    p.write_text(json.dumps({"body": "First doc."}) + "\n\n" + json.dumps({"body": "Second one."}) + "\n")
    expected = tok.encode("First doc.") + [tok.eot_id] + tok.encode("Second one.")
    assert text_tokens(p, "body").tolist() == expected
    assert text_tokens(p, "body", max_tokens=3).tolist() == expected[:3]
    with pytest.raises(UserError, match="no string field 'text'"):
        text_tokens(p)
    plain = tmp_path / "a.txt"
    plain.write_text(TEXT)
    assert text_tokens(plain).tolist() == tok.encode(TEXT)


def test_cli_on_data_folder(ckpt, model, small_data, capsys):
    assert (
        eval_command.main(["--model", str(ckpt), "--data", str(small_data), "--max-tokens", "600", "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    tokens = split_tokens(small_data, "val", max_tokens=600)
    direct = sliding_window_nll(model, tokens)
    assert out["tokens_scored"] == 599
    assert out["mean_nll"] == pytest.approx(direct.mean_nll, rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(direct.bits_per_byte, rel=1e-5)
    assert out["tokens_per_s"] > 0
    args = ["--model", str(ckpt), "--data", str(small_data), "--max-tokens", "300", "--stride", "16"]
    assert eval_command.main(args) == 0
    text = capsys.readouterr().out
    for label in ("tokens scored: 299", "mean NLL:", "perplexity:", "bits per byte:", "tokens/s"):
        assert label in text


def test_cli_on_text_file_in_a_subprocess(ckpt, tmp_path):
    p = tmp_path / "sample.txt"
    p.write_text(TEXT * 3)
    cmd = [sys.executable, "-m", "nanogpt.cli", "eval", "--model", str(ckpt), "--text", str(p)]
    res = subprocess.run([*cmd, "--stride", "32", "--json"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["tokens_scored"] == len(get_tokenizer().encode(TEXT * 3)) - 1
    assert out["stride"] == 32 and out["context"] == 64
    assert out["bits_per_byte"] > 0 and math.isfinite(out["perplexity"])
    # a bad stride is one line on stderr and exit code 2
    res = subprocess.run([*cmd, "--stride", "100"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "--stride 100" in res.stderr


def test_cli_bad_inputs(ckpt, tmp_path):
    base = ["--model", str(ckpt)]
    with pytest.raises(UserError, match="not found"):
        eval_command.main([*base, "--text", str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="no text"):
        eval_command.main([*base, "--text", str(tmp_path / "empty.txt")])
    (tmp_path / "one.txt").write_text("Hello")
    with pytest.raises(UserError, match="at least 2"):
        eval_command.main([*base, "--text", str(tmp_path / "one.txt")])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        eval_command.main([*base, "--text", str(tmp_path / "bad.jsonl")])
    (tmp_path / "ok.txt").write_text(TEXT)
    with pytest.raises(UserError, match="--context 1000"):
        eval_command.main([*base, "--text", str(tmp_path / "ok.txt"), "--context", "1000"])
    with pytest.raises(UserError, match="--stride -1"):
        eval_command.main([*base, "--text", str(tmp_path / "ok.txt"), "--stride", "-1"])
    with pytest.raises(UserError, match="checkpoint .* not found"):
        eval_command.main(["--model", str(tmp_path / "nope"), "--text", str(tmp_path / "ok.txt")])
