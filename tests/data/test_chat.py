"""The chat template, chat/completions preparation with loss masks, the conversation sampler, and the masked
loss in both backends (exactly zero gradient on masked positions)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nanogpt.data.chat import JINJA, encode_chat, prompt_ids, record_kind, record_messages, render
from nanogpt.data.prepare import prepare
from nanogpt.data.shards import IGNORE, STARTS, TRAINED, BatchSampler, TokenData, read_mask
from nanogpt.data.tokenizer import EOT_ID, get_tokenizer
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.optim import cross_entropy_loss
from tests.tiny import tiny_config

SFT = Path(__file__).parent / "sft"
CHAT, COMPLETIONS = SFT / "chat.jsonl", SFT / "completions.jsonl"
TOK = get_tokenizer()


def conversations(path: Path = CHAT) -> list[list[dict[str, str]]]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        out.append(record_messages(row, record_kind(row), f"{path}:{i}"))
    return out


ALL = conversations(CHAT) + conversations(COMPLETIONS)


# ---- the template ------------------------------------------------------------------------------------


def test_template_text_and_mask():
    enc = encode_chat([{"role": "user", "content": " Hi\n"}, {"role": "assistant", "content": "Hello!"}])
    assert render([{"role": "user", "content": " Hi\n"}, {"role": "assistant", "content": "Hello!"}]) == (
        "User:\nHi<|endoftext|>Assistant:\nHello!<|endoftext|>"
    )
    pieces = [(TOK.decode([i]), m) for i, m in zip(enc.ids, enc.mask, strict=True)]
    assert pieces == [
        ("User", 0), (":", 0), ("\n", 0), ("Hi", 0), ("<|endoftext|>", 0),
        ("Assistant", 0), (":", 0), ("\n", 0), ("Hello", 1), ("!", 1), ("<|endoftext|>", 1),
    ]  # fmt: skip
    assert prompt_ids([{"role": "user", "content": "Hi"}])[-3:] == TOK.encode("Assistant:\n")


def test_train_on_prompt_masks_nothing():
    for messages in ALL[:5]:
        enc = encode_chat(messages, train_on_prompt=True)
        assert set(enc.mask) == {1} and enc.ids == encode_chat(messages).ids


@pytest.mark.parametrize("generation", [False, True])
def test_segment_ids_equal_whole_string_ids_on_every_conversation(generation):
    """The mask is built segment by segment; the ids must still be what the whole string tokenizes to."""
    for messages in ALL:
        enc = encode_chat(messages, add_generation_prompt=generation)
        assert enc.ids == TOK.encode_with_eot(render(messages, generation)), render(messages)


def test_jinja_renders_our_string():
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(JINJA)
    for messages in ALL:
        for gen in (False, True):
            assert template.render(messages=messages, add_generation_prompt=gen) == render(messages, gen)


# ---- prepare -----------------------------------------------------------------------------------------


def _prepared(tmp_path: Path, source: Path = CHAT, **kw) -> Path:
    out = tmp_path / f"data-{source.stem}-{len(list(tmp_path.iterdir()))}"
    prepare(str(source), out, val_fraction=0.2, verbose=False, **kw)
    return out


@pytest.mark.parametrize("source,kind", [(CHAT, "chat"), (COMPLETIONS, "completions")])
def test_prepare_writes_conversations_and_masks(tmp_path, source, kind):
    out = _prepared(tmp_path, source)
    data = TokenData(out)
    assert data.meta["format"] == kind and data.is_chat
    expected = conversations(source)
    got = []
    for split in ("train", "val"):
        for shard in data.split(split):
            mask = np.asarray(read_mask(shard.filename, len(shard)))
            starts = list(np.flatnonzero(mask & STARTS)) + [len(shard)]
            for a, b in zip(starts, starts[1:], strict=False):
                got.append((split, list(map(int, shard[a:b])), list(map(int, mask[a:b] & TRAINED))))
    assert {s for s, _, _ in got} == {"train", "val"}  # both splits hold whole conversations
    by_ids = {tuple(encode_chat(m).ids): encode_chat(m).mask for m in expected}
    assert len(got) == len(expected)
    for _, ids, mask in got:
        assert by_ids[tuple(ids)] == mask  # each conversation whole, with its mask


def test_prepare_train_on_prompt_and_unchanged(tmp_path):
    out = _prepared(tmp_path, train_on_prompt=True)
    shard = TokenData(out).split("train")[0]
    assert (np.asarray(read_mask(shard.filename, len(shard))) & TRAINED).all()
    again = prepare(str(CHAT), out, val_fraction=0.2, verbose=False, train_on_prompt=True)
    assert again.status == "unchanged"


def test_skip_bad_counts_and_keeps_the_rest(tmp_path):
    src = tmp_path / "mixed.jsonl"
    good = CHAT.read_text().splitlines()[:6]
    bad = [
        '{"messages": [{"content": "no role"}]}',
        '{"messages": [{"role": "user", "content": "only a user"}]}',
    ]
    src.write_text("\n".join(good[:3] + bad + good[3:]) + "\n")
    result = prepare(str(src), tmp_path / "d", val_fraction=0.2, verbose=False, skip_bad=True)
    assert result.skipped == 2 and sum(result.documents.values()) == 6
    assert "2 bad records skipped" in result.summary()


def test_long_conversation_skipped_not_truncated(tmp_path):
    src = tmp_path / "long.jsonl"
    long = {"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]}
    src.write_text("\n".join([json.dumps(long)] + CHAT.read_text().splitlines()[:4]) + "\n")
    result = prepare(
        str(src), tmp_path / "d", val_fraction=0.2, verbose=False, skip_bad=True, context_length=64
    )
    assert result.skipped == 1 and sum(result.documents.values()) == 4


# ---- batches -----------------------------------------------------------------------------------------


def test_batches_hold_whole_conversations(tmp_path):
    data = TokenData(_prepared(tmp_path))
    shards = data.split("train")
    known = {tuple(encode_chat(m).ids) for m in conversations(CHAT)}
    sampler = BatchSampler(shards, batch_size=4, context_length=63, seed=3)
    for _ in range(5):
        x, y = sampler.next()
        assert x.shape == y.shape == (4, 63)
        for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
            row = row_x + [row_y[-1] if row_y[-1] != IGNORE else EOT_ID]
            # split the row into conversations: each is a known one, then padding (EOT, never scored)
            pos = 0
            while pos < len(row):
                match = [k for k in known if tuple(row[pos : pos + len(k)]) == k]
                if not match:
                    assert set(row[pos:]) == {EOT_ID} and set(row_y[max(pos - 1, 0) :]) == {IGNORE}
                    break
                k = max(match, key=len)
                enc_mask = next(
                    encode_chat(m).mask for m in conversations(CHAT) if tuple(encode_chat(m).ids) == k
                )
                for j in range(max(pos, 1), pos + len(k)):  # target j-1 -> token j: scored iff trained
                    assert (row_y[j - 1] != IGNORE) == bool(enc_mask[j - pos])
                pos += len(k)
            assert pos > 0


def test_sampler_resume_is_exact(tmp_path):
    shards = TokenData(_prepared(tmp_path)).split("train")
    a = BatchSampler(shards, batch_size=3, context_length=63, seed=1)
    a.next()
    state = json.loads(json.dumps(a.state()))  # as state.json carries it
    b = BatchSampler(shards, batch_size=3, context_length=63, seed=99)
    b.load_state(state)
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_conversation_longer_than_context_is_refused(tmp_path):
    shards = TokenData(_prepared(tmp_path)).split("train")
    with pytest.raises(Exception, match="does not fit context_length 8"):
        BatchSampler(shards, batch_size=2, context_length=8, seed=0)


# ---- the masked loss, both backends ------------------------------------------------------------------


def _masked_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (2, 16), generator=g)
    y = torch.randint(0, 50257, (2, 16), generator=g)
    y[0, :9] = IGNORE
    y[1, 4:] = IGNORE
    return x, y


def test_torch_masked_positions_get_zero_gradient():
    """Through the trainer's fused head (`linear_cross_entropy`, what `model(x, targets=y)` runs): the gradient
    of the hidden state at a masked position is exactly zero, every other one is not, and the loss is the
    mean over the trained positions only."""
    from nanogpt.kernels.ops import linear_cross_entropy

    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(tiny_config())
    x, y = _masked_batch()
    masked = (y == IGNORE).flatten()
    with torch.no_grad():
        logits = model(x)
    h = torch.randn(x.numel(), 32, requires_grad=True)
    loss = linear_cross_entropy(h, model.lm_head.weight, y.flatten())
    loss.backward()
    assert (h.grad[masked] == 0).all() and (h.grad[~masked].abs().sum(-1) > 0).all()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1)[~masked], y.flatten()[~masked])
    torch.testing.assert_close(cross_entropy_loss(model, x, y), expected, rtol=1e-5, atol=1e-6)


def test_mlx_masked_positions_get_zero_gradient():
    mx = pytest.importorskip("mlx.core")

    from nanogpt.mlx.model import NanoGPTLMHeadModel as MlxModel
    from nanogpt.mlx.train.optim import cross_entropy_loss as mlx_loss
    from nanogpt.mlx.train.optim import logits_nll, token_nll

    torch.manual_seed(0)
    tm = NanoGPTLMHeadModel(tiny_config())
    model = MlxModel(tiny_config())
    model.load_weights([(k, mx.array(v.detach().numpy())) for k, v in tm.state_dict().items()], strict=False)
    x, y = _masked_batch()
    xm, ym, masked = mx.array(x.numpy()), mx.array(y.numpy()), (y == IGNORE).numpy()
    nll = np.array(token_nll(model, xm, ym))
    assert (nll[masked] == 0).all() and (nll[~masked] > 0).all()
    with torch.no_grad():
        expected = float(cross_entropy_loss(tm, x, y))
    assert abs(float(mlx_loss(model, xm, ym)) - expected) < 1e-4
    logits = model(xm).astype(mx.float32)
    grad = np.array(mx.grad(lambda lg: logits_nll(lg, ym).sum())(logits))
    assert (grad[masked] == 0).all() and (np.abs(grad[~masked]).sum(-1) > 0).all()


def test_torch_accumulation_weights_every_trained_target_alike():
    """Two micro-batches with 7 and 4 trained targets accumulate to the gradient of one batch holding both
    (the mean over all 11 targets), not to the mean of the two micro-batch means."""
    from nanogpt.train.optim import backward_micro_batches, target_shares

    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(tiny_config())
    x, y = _masked_batch()
    halves = [(x[:1], y[:1]), (x[1:], y[1:])]
    shares = target_shares([y[:1], y[1:]])
    assert shares == [7 / 5.5, 4 / 5.5] and target_shares([x[:1], x[1:]]) == [1.0, 1.0]
    loss = backward_micro_batches(model, halves, cross_entropy_loss, torch.device("cpu"), shares=shares)
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    whole = cross_entropy_loss(model, x, y)
    whole.backward()
    torch.testing.assert_close(loss, whole.detach(), rtol=1e-6, atol=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6)


def test_mlx_accumulation_weights_every_trained_target_alike():
    mx = pytest.importorskip("mlx.core")
    import mlx.optimizers as optim

    from nanogpt.config import TrainConfig
    from nanogpt.mlx.model import NanoGPTLMHeadModel as MlxModel
    from nanogpt.mlx.train.optim import make_train_step

    x, y = _masked_batch()
    out = []
    split, whole = (x.reshape(2, 1, 16), y.reshape(2, 1, 16)), (x[None], y[None])  # 2 micro-batches; 1 batch
    for xs, ys in (split, whole):
        mx.random.seed(0)
        model = MlxModel(tiny_config())
        step = make_train_step(model, optim.SGD(learning_rate=0.0), TrainConfig(grad_clip=1e9))
        loss, norm = step(mx.array(xs.numpy()), mx.array(ys.numpy()))
        out.append((float(loss), float(norm)))
    assert out[0] == pytest.approx(out[1], rel=1e-5)


# ---- training on a chat folder: resume stays exact in both backends ---------------------------------


def _resume_is_exact(train, data: Path, tmp_path: Path) -> None:
    from nanogpt.config import TrainConfig
    from nanogpt.train.plot import read_log

    cfg = tiny_config(context_length=63)
    common = dict(batch_size=2, learning_rate=2e-3, warmup_iters=2, lr_decay_iters=6, eval_interval=3)
    common |= dict(eval_iters=1, log_interval=1, device="cpu")
    full = train(cfg, TrainConfig(max_iters=6, **common), data, tmp_path / "a", progress=False)
    train(cfg, TrainConfig(max_iters=3, **common), data, tmp_path / "b", progress=False)
    resumed = train(
        cfg, TrainConfig(max_iters=6, **common), data, tmp_path / "b", resume=True, progress=False
    )
    logs = [[(r["step"], r.get("loss")) for r in read_log(tmp_path / run / "log.jsonl")] for run in "ab"]
    assert logs[0] == logs[1] and resumed.best_val_loss == full.best_val_loss
    assert all(loss is None or np.isfinite(loss) for _, loss in logs[0])


def test_torch_training_on_chat_data_resumes_exactly(tmp_path):
    from nanogpt.train.loop import train

    _resume_is_exact(train, _prepared(tmp_path), tmp_path)


def test_mlx_training_on_chat_data_resumes_exactly(tmp_path):
    pytest.importorskip("mlx.core")
    from nanogpt.mlx.train.loop import train

    _resume_is_exact(train, _prepared(tmp_path), tmp_path)


# ---- evaluation ----------------------------------------------------------------------------------------


def test_eval_scores_a_chat_folder_on_its_assistant_tokens(tmp_path, capsys):
    """`nanogpt eval` on a chat folder: every conversation whole, only the targets training scores."""
    from nanogpt import cli
    from nanogpt.data.shards import split_conversations
    from nanogpt.train.checkpoint import save_model

    data = _prepared(tmp_path)
    wanted = {tuple(encode_chat(m).ids): encode_chat(m).mask for m in conversations()}
    val = split_conversations(data, "val")
    assert val and split_conversations(_plain(tmp_path), "val") is None
    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(tiny_config()).eval()
    ckpt = save_model(tmp_path / "ckpt", model)
    total, n = 0.0, 0
    for ids, trained in val:
        assert wanted[tuple(ids.tolist())] == trained.astype(int).tolist()  # whole, with its own mask
        x, y, keep = torch.from_numpy(ids[:-1]), torch.from_numpy(ids[1:]), torch.from_numpy(trained[1:])
        with torch.no_grad():
            logits = model(x[None])[0]
        total += torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum").item()
        n += int(keep.sum())
    assert cli.main(["eval", "--model", str(ckpt), "--data", str(data), "--json", "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["mode"] == "conversations" and got["documents"] == len(val) and got["tokens_scored"] == n
    assert got["mean_nll"] == pytest.approx(total / n, abs=1e-5)
    assert cli.main(["eval", "--model", str(ckpt), "--data", str(data), "--no-progress"]) == 0
    assert f"the assistant tokens of {len(val)} conversations, each whole" in capsys.readouterr().out
    # every token as one stream is another quantity, and --stride has no meaning here
    assert cli.main(["eval", "--model", str(ckpt), "--data", str(data), "--json", "--stream"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens_scored"] > n
    assert cli.main(["eval", "--model", str(ckpt), "--data", str(data), "--stride", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--stride does not apply" in err and "--stream" in err


def _plain(tmp_path: Path) -> Path:
    text = tmp_path / "plain.txt"
    text.write_text("Plain text for a plain folder. " * 200, encoding="utf-8")
    out = tmp_path / "plain"
    prepare(str(text), out, val_fraction=0.2, verbose=False)
    return out
