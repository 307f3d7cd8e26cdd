"""Sliding-window evaluation against direct computations written out here, and the `nanogpt eval` command.

Two readings of a split: one stream (`--stream`), and each document on its own (the default, lm-eval's
`loglikelihood_rolling` convention; `tests/infer/test_lm_eval.py` holds it against lm-eval itself).
"""

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
from nanogpt.data.tokenizer import EOT_ID, get_tokenizer
from nanogpt.errors import SettingError, UserError
from nanogpt.infer.evaluate import (
    Window,
    bits_per_byte,
    document_nlls,
    document_windows,
    iter_windows,
    perplexity,
    sliding_window_nll,
    split_documents,
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


@pytest.mark.parametrize(
    "n,context,stride", [(2, 4, 4), (5, 4, 4), (6, 4, 4), (10, 4, 1), (11, 4, 3), (100, 16, 5)]
)
def test_document_windows_score_every_target_once_with_full_context(n, context, stride):
    scored = []
    for i, w in enumerate(document_windows(n, context, stride)):
        assert 1 <= w.scored <= w.length <= context and w.start + w.length <= n - 1
        if i:  # after the first window: a whole context of history, the last window included
            assert w.length == context and w.scored <= stride
        scored += range(w.start + w.length - w.scored + 1, w.start + w.length + 1)
    assert scored == list(range(1, n))


def test_document_windows_are_lm_evals_rolling_windows():
    # [EOT] + 9 tokens, context 4: lm-eval's get_rolling_token_windows(doc, EOT, 4, context_len=1) feeds
    # [EOT d0 d1 d2] -> d0..d3, then [d3 d4 d5 d6] -> d4..d7, then [d4 d5 d6 d7] -> d8 alone
    assert list(document_windows(10, 4, 4)) == [Window(0, 4, 4), Window(4, 4, 4), Window(5, 4, 1)]
    assert list(document_windows(1, 4, 4)) == []  # an empty document scores nothing


def test_split_documents_drops_separators_and_empty_documents():
    tokens = torch.tensor([EOT_ID, 5, 6, EOT_ID, EOT_ID, 7, EOT_ID, 8])
    assert [d.tolist() for d in split_documents(tokens)] == [[5, 6], [7], [8]]
    assert split_documents(torch.tensor([EOT_ID])) == []


def direct_document_nll(model: NanoGPTLMHeadModel, doc: list[int], context: int) -> float:
    """lm-eval's rolling windows written out: chunks of `context` targets, each fed the `context` tokens
    before its last target (the first one starts from <|endoftext|>)."""
    seq = torch.tensor([EOT_ID, *doc])
    total, done = 0.0, 0  # targets are seq[1:]; `done` of them are scored
    while done < len(doc):
        end = min(done + context, len(doc))  # targets seq[done + 1 .. end]
        start = max(0, end - context)
        x, y = seq[start:end], seq[start + 1 : end + 1]
        with torch.no_grad():
            logits = model(x[None])[0].float()
        skip = len(x) - (end - done)
        total += F.cross_entropy(logits[skip:], y[skip:], reduction="sum").item()
        done = end
    return total


def test_per_document_scores_each_document_on_its_own(model):
    tok = get_tokenizer()
    # one window; a full one, then one target with a whole context; three, the last one ragged
    texts = [TEXT[:20], TEXT + TEXT[:60], TEXT * 3]
    docs = [tok.encode(t) for t in texts]
    assert [len(d) for d in docs] == [5, 65, 159]
    nlls = document_nlls(model, docs, batch_size=3)
    for doc, nll in zip(docs, nlls, strict=True):
        assert nll == pytest.approx(direct_document_nll(model, doc, 64), rel=1e-5)
    # the same through a stream: separators only cut it, bytes are the texts' own
    stream = torch.tensor([t for d in docs for t in [*d, EOT_ID]])
    r = sliding_window_nll(model, stream, per_document=True, batch_size=2)
    assert (r.mode, r.documents, r.tokens_scored) == ("documents", 3, sum(map(len, docs)))
    assert r.n_bytes == sum(len(t.encode("utf-8")) for t in texts)
    assert r.mean_nll * r.tokens_scored == pytest.approx(sum(nlls), rel=1e-6)
    assert r.bits_per_byte == pytest.approx(sum(nlls) / math.log(2) / r.n_bytes, rel=1e-9)
    # the stream reading scores the separators too (13 bytes each), but not its first token
    s = sliding_window_nll(model, stream)
    first = len(tok.decode_bytes(stream[:1].tolist()))
    assert s.tokens_scored == len(stream) - 1 and s.n_bytes == r.n_bytes + 3 * len(b"<|endoftext|>") - first
    assert not math.isclose(s.bits_per_byte, r.bits_per_byte, rel_tol=1e-3)


def test_per_document_with_a_smaller_stride_gives_more_history(model):
    doc = get_tokenizer().encode(TEXT * 2)
    (full,) = document_nlls(model, [doc], context=32)
    (overlap,) = document_nlls(model, [doc], context=32, stride=8)
    assert full == pytest.approx(direct_document_nll(model, doc, 32), rel=1e-5)
    assert not math.isclose(full, overlap, rel_tol=1e-6)
    # stride 1: every target sees the 32 tokens before it (or all of them, near the start)
    seq, total = torch.tensor([EOT_ID, *doc[:80]]), 0.0
    for t in range(1, len(seq)):
        with torch.no_grad():
            logits = model(seq[max(0, t - 32) : t][None])[0, -1]
        total += F.cross_entropy(logits[None], seq[t : t + 1]).item()
    assert document_nlls(model, [doc[:80]], context=32, stride=1)[0] == pytest.approx(total, rel=1e-5)


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
    # the library names its settings (`stride`), `nanogpt eval` their flags (--stride: test_cli_bad_inputs)
    with pytest.raises(SettingError, match="`stride` 0") as e:
        sliding_window_nll(model, tokens, stride=0)
    assert e.value.with_flags({"stride": "--stride"}).args[0].startswith("--stride 0 must be in 1..64")
    with pytest.raises(UserError, match="`stride` 65"):
        sliding_window_nll(model, tokens, stride=65)
    with pytest.raises(UserError, match="`context` 65"):
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
    base = ["--model", str(ckpt), "--data", str(small_data), "--max-tokens", "600", "--json"]
    assert eval_command.main([*base, "--stream"]) == 0
    out = json.loads(capsys.readouterr().out)
    tokens = split_tokens(small_data, "val", max_tokens=600)
    direct = sliding_window_nll(model, tokens)
    assert out["tokens_scored"] == 599 and out["mode"] == "stream"
    assert out["mean_nll"] == pytest.approx(direct.mean_nll, rel=1e-5)
    assert out["bits_per_byte"] == pytest.approx(direct.bits_per_byte, rel=1e-5)
    assert out["tokens_per_s"] > 0
    assert eval_command.main(base) == 0  # the default: per document (the val split's one work, cut at 600)
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "documents" and out["documents"] == 1 and out["tokens_scored"] == 600
    assert out["mean_nll"] * 600 == pytest.approx(document_nlls(model, [tokens.tolist()])[0], rel=1e-5)
    args = ["--model", str(ckpt), "--data", str(small_data), "--max-tokens", "300", "--stride", "16"]
    assert eval_command.main([*args, "--stream"]) == 0
    text = capsys.readouterr().out
    for label in (
        "tokens scored: 299 (one stream;",
        "mean NLL:",
        "perplexity:",
        "bits per byte:",
        "tokens/s",
    ):
        assert label in text
    assert eval_command.main(args) == 0
    assert (
        "tokens scored: 300 (1 documents, each on its own; context 64, stride 16" in capsys.readouterr().out
    )


def test_cli_on_text_file_in_a_subprocess(ckpt, tmp_path):
    p = tmp_path / "sample.txt"
    p.write_text(TEXT * 3)
    cmd = [sys.executable, "-m", "nanogpt.cli", "eval", "--model", str(ckpt), "--text", str(p)]
    res = subprocess.run([*cmd, "--stride", "32", "--json"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    # one text file is one document: every token scored, the first after <|endoftext|>
    assert out["tokens_scored"] == len(get_tokenizer().encode(TEXT * 3)) and out["documents"] == 1
    assert out["n_bytes"] == len((TEXT * 3).encode("utf-8"))
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
