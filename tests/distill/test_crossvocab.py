"""Teachers of another vocabulary: the ULD loss against hand values and its invariances, byte-offset alignment,
and a local Hugging Face teacher (a 400-token BPE, built here) through `nanogpt distill --kind sequence|uld`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nanogpt.commands.distill import main
from nanogpt.data.shards import TokenData
from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.distill.client import AnswerCache
from nanogpt.distill.losses import uld_distance, uld_parts
from nanogpt.errors import UserError
from tests.corpus import real_texts

LN = math.log

# --- the loss -------------------------------------------------------------------------------------------------


def logits_of(*probs: float) -> torch.Tensor:
    """Logits (1, V) whose softmax is `probs` (0 -> -inf)."""
    return torch.tensor([[LN(p) if p > 0 else -math.inf for p in probs]], dtype=torch.float64)


def test_uld_matches_hand_values():
    # student (0.5, 0.3, 0.2), teacher (0.1, 0.9): sorted 0.5 0.3 0.2 vs 0.9 0.1 0 (padded)
    s, t = logits_of(0.5, 0.3, 0.2), logits_of(0.1, 0.9)
    assert uld_distance(s, t).item() == pytest.approx(0.4 + 0.2 + 0.2, abs=1e-12)
    # T = 2 tempers both: p_i proportional to sqrt(p_i)
    sq = [math.sqrt(p) for p in (0.5, 0.3, 0.2)]
    tq = [math.sqrt(p) for p in (0.9, 0.1)]
    qs = [x / sum(sq) for x in sq]
    ps = [x / sum(tq) for x in tq] + [0.0]
    assert uld_distance(s, t, T=2.0).item() == pytest.approx(
        sum(abs(a - b) for a, b in zip(ps, qs, strict=True)), abs=1e-12
    )
    # alpha mixes the data's cross-entropy (-ln 0.3 for target 1) with the mean ULD of the aligned rows
    y = torch.tensor([1])
    parts = uld_parts(s, y, t, torch.tensor([0]), alpha=0.25)
    assert parts.hard.item() == pytest.approx(-LN(0.3), abs=1e-12)
    assert parts.soft.item() == pytest.approx(0.8, abs=1e-12)
    assert parts.total.item() == pytest.approx(0.25 * -LN(0.3) + 0.75 * 0.8, abs=1e-12)
    # no aligned position: the soft half is 0, the hard one stays
    none = uld_parts(s, y, t[:0], torch.zeros(0, dtype=torch.long), alpha=0.25)
    assert none.soft.item() == 0.0 and none.total.item() == pytest.approx(0.25 * -LN(0.3), abs=1e-12)


def test_uld_is_invariant_to_permuting_either_vocabulary():
    torch.manual_seed(3)
    s, t = torch.randn(4, 11, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    base = uld_distance(s, t)
    assert (base > 0).all()
    assert torch.allclose(uld_distance(s[:, torch.randperm(11)], t), base, atol=1e-14, rtol=0)
    assert torch.allclose(uld_distance(s, t[:, torch.randperm(7)]), base, atol=1e-14, rtol=0)
    # symmetric in its two arguments (an L1 distance between sorted vectors)
    assert torch.allclose(uld_distance(t, s), base, atol=1e-14, rtol=0)


def test_uld_is_zero_when_the_sorted_distributions_match():
    p = torch.softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    teacher = p.log()
    # the student holds the same probabilities in another order, plus 3 tokens of probability 0
    student = torch.cat([teacher[:, [4, 2, 0, 3, 1]], torch.full((3, 3), -math.inf, dtype=torch.float64)], -1)
    assert uld_distance(student, teacher).abs().max().item() < 1e-12
    assert uld_distance(student, student.roll(1, -1)).abs().max().item() < 1e-12
    moved = student.clone()
    moved[:, 0] += 0.5
    assert (uld_distance(moved, teacher) > 1e-3).all()


def test_uld_gradcheck():
    torch.manual_seed(4)
    s = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (3, 2))
    pos = torch.tensor([0, 2, 3, 5])
    assert torch.autograd.gradcheck(lambda s, t: uld_parts(s, y, t, pos, 0.3, 1.5).total, (s, t))
    assert torch.autograd.gradcheck(lambda s: uld_distance(s[0], t[:2].detach(), 0.7).sum(), (s,))


# --- alignment --------------------------------------------------------------------------------------------------


def test_text_with_byte_offsets_maps_characters_to_their_bytes():
    from nanogpt.distill.uld import text_with_byte_offsets

    data = "aé“b".encode()
    text, starts = text_with_byte_offsets(data)
    assert text == "aé“b" and starts.tolist() == [0, 1, 3, 6, 7]
    # a window cut inside "é" (its continuation byte first) and inside "“" (its lead bytes last)
    text, starts = text_with_byte_offsets(data[2:5])
    assert text == "\ufffd\ufffd\ufffd" and starts.tolist() == [0, 1, 2, 3]
    text, starts = text_with_byte_offsets(b"x" + data[1:3] + b"\xe2\x80")
    assert text == "xé\ufffd\ufffd" and starts.tolist() == [0, 1, 3, 4, 5]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.distill.other_vocab import save_other_vocab_teacher

    return save_other_vocab_teacher(tmp_path_factory.mktemp("other_vocab") / "llama")


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    from nanogpt.distill.crossvocab import load_text_teacher

    return load_text_teacher(teacher_dir)


def test_aligned_positions_predict_from_the_same_text(teacher):
    from nanogpt.distill.uld import UldLossFn

    tok = get_tokenizer()
    loss_fn = UldLossFn(teacher)
    text = real_texts(3)[2] + " naïve “quotes” — done"
    ids = tok.encode(text)
    windows = [
        ids[:60],
        ids[5:65],
        ids[-40:],
        tok.encode("é“")[1:] + ids[:20],
    ]  # the last starts mid-character
    for w, a in zip(windows, loss_fn.align(windows), strict=True):
        assert len(a.student_pos) >= 0.5 * (len(w) - 1), (len(a.student_pos), len(w))
        for t, j in zip(a.student_pos, a.teacher_pos, strict=True):
            student_prefix = tok.decode_bytes(w[: t + 1])
            teacher_prefix = teacher.tokenizer.decode(a.teacher_ids[: j + 1], skip_special_tokens=True)
            if b"\xef\xbf\xbd" not in teacher_prefix.encode():  # a U+FFFD stands for a broken byte
                assert teacher_prefix.encode() == student_prefix, (t, j)
    # our BPE splits the llama's 4 bytes over 3 tokens: the positions inside the character are never aligned
    w = tok.encode(" a🦙b")
    assert [len(tok.decode_bytes([i])) for i in w] == [2, 2, 1, 1, 1]
    assert loss_fn.align([w])[0].student_pos == [0, 3]


# --- a local teacher of another vocabulary through `nanogpt distill` -----------------------------------------


def kd_args(student, data, out, teacher, *extra):
    return [
        "--student", str(student), "--data", str(data), "--out", str(out), "--teacher", str(teacher),
        "--batch-size", "2", "--eval-iters", "1", "--eval-interval", "2", "--device", "cpu", "--no-progress",
        *extra,
    ]  # fmt: skip


SEQ = ["--kind", "sequence", "--prompts", "6", "--prompt-tokens", "16", "--reply-tokens", "12"]


def test_sequence_kind_generates_locally_caches_and_resumes_for_free(
    teacher_dir, student, small_data, tmp_path, capsys
):
    out = tmp_path / "seq"
    assert (
        main(kd_args(student, small_data, out, teacher_dir, *SEQ, "--max-iters", "2", "--teacher-batch", "4"))
        == 0
    )
    err = capsys.readouterr().err
    assert "teacher replies: 0 from the cache, 6 generated (2 generate calls)" in err
    rows = [
        json.loads(x)
        for x in (tmp_path / "seq.teacher" / "chat_data" / "replies.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 6 and all(r["model"] == "llama" and r["prompt"] and r["reply"].strip() for r in rows)
    data = TokenData(tmp_path / "seq.teacher" / "chat_data")
    assert data.meta["source"]["kind"] == "local-teacher"
    # each document: its prompt's tokens, then the reply re-tokenized with our BPE, then EOT
    tok = get_tokenizer()
    docs = [tok.encode(r["prompt"]) + tok.encode(r["reply"]) + [tok.eot_id] for r in rows]
    assert data.split("train")[0].tolist() == [t for d in docs for t in d]
    # resumed: every reply comes from the cache, the teacher is never asked (nor loaded)
    assert main(["--out", str(out), "--resume", "--max-iters", "3", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "teacher replies: 6 from the cache, 0 generated (0 generate calls)" in err
    assert json.loads((out / "last" / "state.json").read_text())["step"] == 3


def test_local_replies_count_real_generate_calls(teacher, teacher_dir, tmp_path):
    from nanogpt.distill.crossvocab import LocalReplies, teacher_identity
    from nanogpt.distill.sequence import reply_request

    calls = []
    generate = teacher.module.generate

    def counted(*args, **kwargs):  # the real generate, counted
        calls.append(kwargs["input_ids"].shape)
        return generate(*args, **kwargs)

    teacher.module.generate = counted
    try:
        requests = [reply_request("llama", t, 8, 100 + i) for i, t in enumerate(real_texts(5, 80))]
        cache = AnswerCache(tmp_path / "cache.sqlite")
        first = LocalReplies(lambda: teacher, cache, teacher_identity(teacher_dir), batch=2)(requests)
        assert len(calls) == 3 and [c[0] for c in calls] == [2, 2, 1] and len(cache) == 5
        again = LocalReplies(lambda: pytest.fail("loaded"), cache, teacher_identity(teacher_dir), batch=2)
        assert again(requests) == first and len(calls) == 3 and again.cached == 5
        # a half-filled cache (an interrupted run): only the missing replies are generated
        cache2 = AnswerCache(tmp_path / "cache2.sqlite")
        LocalReplies(lambda: teacher, cache2, teacher_identity(teacher_dir), batch=8)(requests[:3])
        calls.clear()
        third = LocalReplies(lambda: teacher, cache2, teacher_identity(teacher_dir), batch=8)
        third(requests)
        assert (third.cached, third.generated) == (3, 2) and [c[0] for c in calls] == [2]
        # another teacher identity never replays these answers
        other = LocalReplies(lambda: teacher, cache, "local:/elsewhere#0", batch=8)
        other(requests[:1])
        assert other.generated == 1
    finally:
        teacher.module.generate = generate


def test_sequence_kind_without_a_chat_template_continues_the_text(student, small_data, tmp_path, capsys):
    pytest.importorskip("transformers")
    from nanogpt.distill.crossvocab import load_text_teacher
    from nanogpt.distill.sequence import CHAT_INSTRUCTION, reply_request
    from tests.distill.other_vocab import save_other_vocab_teacher

    base = load_text_teacher(save_other_vocab_teacher(tmp_path / "base", chat_template=False))
    req = reply_request("base", "To be, or not", 4, 0)
    assert base.tokenizer.decode(base.prompt_ids(req)) == "To be, or not"  # no instruction for a base model
    chat = load_text_teacher(save_other_vocab_teacher(tmp_path / "chat", chat_template=True))
    assert (
        chat.tokenizer.decode(chat.prompt_ids(req))
        == f"<s>user: {CHAT_INSTRUCTION}To be, or not\n<s>assistant: "
    )


def test_uld_kind_trains_and_its_soft_loss_falls(teacher_dir, student, small_data, tmp_path):
    out = tmp_path / "uld"
    flat = ["--learning-rate", "3e-3", "--min-lr", "3e-3", "--warmup-iters", "0", "--alpha", "0"]
    assert (
        main(kd_args(student, small_data, out, teacher_dir, "--kind", "uld", "--max-iters", "12", *flat)) == 0
    )
    log = [json.loads(x) for x in (tmp_path / "uld.teacher" / "distill_log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and all(0.0 <= r["soft"] <= 2.0 and r["aligned"] >= 0.5 for r in log)
    soft = [r["soft"] for r in log]
    # the student moves its mass towards the teacher's sorted shape (~1.98 -> ~1.90 in 12 steps)
    assert max(soft[-3:]) < min(soft[:3]) and sum(soft[-3:]) / 3 < sum(soft[:3]) / 3 - 0.03, soft


def test_other_vocab_teacher_needs_a_cross_vocab_kind(teacher_dir, runs_dir, student, small_data, tmp_path):
    with pytest.raises(UserError, match="another tokenizer.*--kind sequence.*--kind uld"):
        main(kd_args(student, small_data, tmp_path / "a", teacher_dir, "--max-iters", "1"))
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(UserError, match=r"\.gguf file.*--kind sequence.*--kind uld"):
        main(kd_args(student, small_data, tmp_path / "b", fake, "--max-iters", "1"))
    with pytest.raises(UserError, match="not a Hugging Face model folder or a .gguf file"):
        main(kd_args(student, small_data, tmp_path / "c", runs_dir, "--kind", "uld", "--max-iters", "1"))
    with pytest.raises(UserError, match="--kind uld does not apply to a completions: teacher"):
        main(
            kd_args(
                student, small_data, tmp_path / "d", "completions:m@http://127.0.0.1:9/v1", "--kind", "uld"
            )
        )
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((teacher_dir / "config.json").read_text())
    with pytest.raises(UserError, match="cannot load the tokenizer"):
        main(kd_args(student, small_data, tmp_path / "e", no_tok, "--kind", "uld", "--max-iters", "1"))


@pytest.fixture
def runs_dir(student):
    """A nanogpt checkpoint (the student itself): it has no tokenizer of its own."""
    return student
