"""Distillation: the losses against hand values and gradcheck, local teachers through the real trainer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nanogpt.commands.distill import main
from nanogpt.config import ModelConfig
from nanogpt.distill.local import DistillLossFn, load_local_teacher
from nanogpt.distill.losses import distill_parts, divergence, sparse_kl
from nanogpt.distill.teachers import parse_teacher
from nanogpt.errors import UserError
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import save_model
from nanogpt.train.loop import train
from tests.tiny import quick_train_config, tiny_config

LN = math.log

# --- the losses -----------------------------------------------------------------------------------------


def two_token_case():
    """Student uniform over 2 tokens; teacher (0.75, 0.25); the data says token 0."""
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[LN(0.75), LN(0.25)]], dtype=torch.float64)
    return s, t, torch.tensor([0])


def test_forward_and_reverse_kl_match_hand_values():
    s, t, y = two_token_case()
    fwd = 0.75 * LN(0.75 / 0.5) + 0.25 * LN(0.25 / 0.5)  # KL(p || q) = 0.130812
    rev = 0.5 * LN(0.5 / 0.75) + 0.5 * LN(0.5 / 0.25)  # KL(q || p) = 0.143841
    assert distill_parts(s, y, t, alpha=0.0).soft.item() == pytest.approx(fwd, abs=1e-12)
    assert distill_parts(s, y, t, alpha=0.0, divergence_name="reverse_kl").soft.item() == pytest.approx(
        rev, abs=1e-12
    )
    # alpha mixes the data's cross-entropy (ln 2 for a uniform student) with the soft loss
    assert distill_parts(s, y, t, alpha=0.5).total.item() == pytest.approx(0.5 * LN(2) + 0.5 * fwd, abs=1e-12)
    assert distill_parts(s, y, t, alpha=1.0).total.item() == pytest.approx(LN(2), abs=1e-12)


def test_temperature_softens_the_teacher_and_scales_by_t_squared():
    s, t, y = two_token_case()
    # T = 2: p_i proportional to sqrt(p_i); the uniform student stays uniform
    a, b = math.sqrt(0.75), math.sqrt(0.25)
    p = (a / (a + b), b / (a + b))
    kl = p[0] * LN(p[0] / 0.5) + p[1] * LN(p[1] / 0.5)
    assert distill_parts(s, y, t, alpha=0.0, T=2.0).soft.item() == pytest.approx(4 * kl, abs=1e-12)


def test_jsd_matches_hand_value_and_is_symmetric_at_half():
    s, t, y = two_token_case()
    p, q = (0.75, 0.25), (0.5, 0.5)
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]
    want = 0.5 * sum(a * LN(a / c) for a, c in zip(p, m, strict=True)) + 0.5 * sum(
        b * LN(b / c) for b, c in zip(q, m, strict=True)
    )
    assert distill_parts(s, y, t, alpha=0.0, divergence_name="jsd").soft.item() == pytest.approx(
        want, abs=1e-12
    )
    swapped = distill_parts(t, y, s, alpha=0.0, divergence_name="jsd").soft.item()
    assert swapped == pytest.approx(want, abs=1e-12)
    assert want <= LN(2)  # bounded


def test_divergences_are_zero_for_equal_distributions():
    logp = torch.log_softmax(torch.randn(5, 7, dtype=torch.float64), -1)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert divergence(logp, logp, kind).abs().max().item() < 1e-12
    with pytest.raises(UserError, match="unknown divergence"):
        divergence(logp, logp, "l2")


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_distill_loss_gradcheck(kind):
    torch.manual_seed(0)
    s = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 6, dtype=torch.float64)
    y = torch.randint(0, 6, (2, 3))
    assert torch.autograd.gradcheck(lambda s: distill_parts(s, y, t, 0.3, 1.7, kind, 0.4).total, (s,))


def test_sparse_kl_hand_value_with_rest_bucket():
    # V = 4, student uniform (q = 1/4 each). Teacher top-2: ids 2, 0 with p = 0.5, 0.3 -> rest 0.2.
    s = torch.zeros(1, 4, dtype=torch.float64)
    ids = torch.tensor([[2, 0]])
    lp = torch.tensor([[LN(0.5), LN(0.3)]], dtype=torch.float64)
    want = 0.5 * LN(0.5 / 0.25) + 0.3 * LN(0.3 / 0.25) + 0.2 * LN(0.2 / 0.5)
    assert sparse_kl(s, ids, lp).item() == pytest.approx(want, abs=1e-12)


def test_sparse_kl_is_zero_iff_buckets_agree_and_never_negative():
    torch.manual_seed(1)
    t_logits = torch.randn(6, 50, dtype=torch.float64)
    t_logp = torch.log_softmax(t_logits, -1)
    lp, ids = t_logp.topk(5, dim=-1)
    # the teacher's own full distribution agrees on every bucket: KL 0
    assert sparse_kl(t_logits, ids, lp).item() == pytest.approx(0.0, abs=1e-12)
    # reshuffling mass *inside* the rest bucket changes nothing: it is one bucket
    moved = t_logits.clone()
    for r in range(6):
        rest = [i for i in range(50) if i not in ids[r].tolist()]
        moved[r, rest] = t_logits[r, rest].flip(0)
    assert not torch.equal(moved, t_logits)
    assert sparse_kl(moved, ids, lp).item() == pytest.approx(0.0, abs=1e-12)
    for _ in range(20):
        s = torch.randn(6, 50, dtype=torch.float64)
        assert sparse_kl(s, ids, lp).item() > 0.0
    # with temperature and padding it stays >= 0 and 0 at equality
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, -1] = False
    assert sparse_kl(t_logits, ids, lp, T=2.0, valid=valid).item() == pytest.approx(0.0, abs=1e-12)


def test_sparse_kl_gradcheck_and_row_mask():
    torch.manual_seed(2)
    s = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    t = torch.log_softmax(torch.randn(3, 10, dtype=torch.float64), -1)
    lp, ids = t.topk(4, dim=-1)
    valid = torch.tensor([[True, True, True, False]] * 3)
    assert torch.autograd.gradcheck(lambda s: sparse_kl(s, ids, lp, 1.5, valid), (s,))
    rows = torch.tensor([True, False, True])
    full = torch.stack([sparse_kl(s[i : i + 1], ids[i : i + 1], lp[i : i + 1]) for i in range(3)])
    assert sparse_kl(s, ids, lp, row_mask=rows).item() == pytest.approx(
        (full[0] + full[2]).item() / 2, abs=1e-12
    )
    assert sparse_kl(s, ids, lp, row_mask=torch.zeros(3, dtype=torch.bool)).item() == 0.0


# --- local teachers ------------------------------------------------------------------------------------------


# the shared quick recipe at batch 4 with a flat, higher learning rate: the teacher must learn in 30 steps
FLAT_LR = {"batch_size": 4, "warmup_iters": 0, "learning_rate": 3e-3, "min_lr": 3e-3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data):
    """A teacher trained 30 steps (it learns the unigram/bigram statistics) and an untrained student."""
    root = tmp_path_factory.mktemp("distill_runs")
    cfg = tiny_config(context_length=32)
    train(
        cfg,
        quick_train_config(max_iters=30, eval_interval=30, **FLAT_LR),
        small_data,
        root / "teacher",
        progress=False,
    )
    torch.manual_seed(5)
    save_model(root / "student", NanoGPTLMHeadModel(cfg))
    return root


def test_local_teacher_soft_loss_falls_through_train(runs, small_data, tmp_path):
    teacher = load_local_teacher(runs / "teacher")
    assert teacher.family == "nanogpt"
    loss_fn = DistillLossFn(teacher, alpha=0.0, T=1.0)  # pure soft loss: the student chases the teacher
    cfg = ModelConfig.load(runs / "student" / "config.json")
    res = train(
        cfg,
        quick_train_config(max_iters=12, eval_interval=12, **FLAT_LR),
        small_data,
        tmp_path / "kd",
        init_from=str(runs / "student"),
        progress=False,
        loss_fn=loss_fn,
        loss_log=loss_fn.log,
    )
    assert [h["step"] for h in loss_fn.log.history] == list(range(1, 13))  # one record a step, numbered
    assert res.steps == 12
    soft = [h["soft"] for h in loss_fn.log.history]
    assert sum(soft[-3:]) / 3 < 0.8 * sum(soft[:3]) / 3, soft
    assert all(h["soft"] >= 0 for h in loss_fn.log.history)


def test_hf_teacher_same_vocab_loads_and_matches_shapes(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=50257)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path / "hf")
    teacher = load_local_teacher(tmp_path / "hf")
    x = torch.randint(0, 50257, (2, 8))
    out = teacher.logits(x)
    assert out.shape == (2, 8, 50257) and not out.requires_grad
    with pytest.raises(UserError, match="context"):
        teacher.logits(torch.zeros(1, 40, dtype=torch.long))


def test_other_vocab_teacher_is_refused(tmp_path, runs):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=201088)
    (tmp_path / "oss").mkdir()
    (tmp_path / "oss" / "config.json").write_text(json.dumps({**hf_cfg.to_dict(), "model_type": "gpt_oss"}))
    with pytest.raises(UserError, match="another tokenizer.*chat:MODEL@URL"):
        load_local_teacher(tmp_path / "oss")
    small = tiny_config(vocab_size=1000, n_layers=1, d_ff=64, context_length=32)
    save_model(tmp_path / "small_vocab", NanoGPTLMHeadModel(small))
    with pytest.raises(UserError, match="vocab_size 1000"):
        load_local_teacher(tmp_path / "small_vocab")


def test_parse_teacher_specs():
    assert parse_teacher("runs/big").source == "local"
    s = parse_teacher("chat:openai/gpt-oss-20b@https://api.groq.com/openai/v1/")
    assert (s.source, s.model, s.base_url) == ("chat", "openai/gpt-oss-20b", "https://api.groq.com/openai/v1")
    with pytest.raises(UserError, match="completions:MODEL@BASE_URL"):
        parse_teacher("completions:gpt2")
    # the model ends at the first "@scheme://": a model name may hold "@"
    s = parse_teacher("completions:org/m@v2@http://127.0.0.1:8000/v1")
    assert (s.model, s.base_url) == ("org/m@v2", "http://127.0.0.1:8000/v1")


def test_library_refusals_name_settings_and_the_command_names_flags(monkeypatch):
    """The library speaks no CLI: a refusal marks the setting (`method`, `timeout`...); `nanogpt distill` says
    the flag in its place, so the CLI line is what it always was."""
    from nanogpt.commands.distill import FLAGS, flagged
    from nanogpt.distill.client import ApiConfig
    from nanogpt.distill.losses import TEACHER_SPECS, check_distill_settings
    from nanogpt.errors import SettingError

    monkeypatch.delenv("NANOGPT_UNSET_KEY", raising=False)
    refusals = []
    for call in (
        lambda: parse_teacher("http://127.0.0.1:8000/v1"),
        lambda: ApiConfig("http://127.0.0.1:9/v1", "m", timeout=0),
        lambda: ApiConfig(
            "http://127.0.0.1:9/v1", "m", api_key_env="NANOGPT_UNSET_KEY", key_required=True
        ).api_key(),
        lambda: check_distill_settings(0.5, 1.0, "jsd", 1.5),
    ):
        with pytest.raises(SettingError) as e:
            call()
        refusals.append(e.value)
    assert [e.setting for e in refusals] == ["teacher", "timeout", "api_key_env", "beta"]
    assert all("--" not in str(e) and f"`{e.setting}`" in str(e) for e in refusals)
    said = [str(e.with_flags(FLAGS)) for e in refusals]
    assert said[0].startswith("--teacher 'http://") and "`" not in said[0]
    assert said[1] == "--timeout 0 is out of range: give seconds in (0, 86400]"
    assert said[2].startswith("--api-key-env NANOGPT_UNSET_KEY: that environment variable is not set")
    assert said[3].endswith("e.g. --beta 0.5")
    assert "--kind" not in TEACHER_SPECS and "--kind sequence or --kind uld" in flagged(TEACHER_SPECS)


def test_distill_command_local_teacher_and_resume(runs, small_data, tmp_path, capsys):
    out = tmp_path / "kd"
    common = ["--teacher", str(runs / "teacher"), "--out", str(out), "--no-progress", "--batch-size", "2"]
    args = [*common, "--student", str(runs / "student"), "--data", str(small_data), "--max-iters", "2"]
    assert main([*args, "--eval-interval", "2", "--eval-iters", "1", "--device", "cpu"]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["learning_rate"] == 3e-5 and saved["distill_alpha"] == 0.5  # the card's stage by default
    assert main([*common, "--resume", "--max-iters", "4"]) == 0
    assert json.loads((out / "last" / "state.json").read_text())["step"] == 4
    log = (tmp_path / "kd.teacher" / "distill_log.jsonl").read_text().splitlines()
    assert len(log) == 4
    with pytest.raises(UserError, match="another tokenizer|vocab"):
        bad = tmp_path / "bad"
        save_model(bad, NanoGPTLMHeadModel(tiny_config(vocab_size=500, n_layers=1, d_ff=64)))
        main(
            [
                "--teacher",
                str(bad),
                "--student",
                str(runs / "student"),
                "--data",
                str(small_data),
                "--out",
                str(tmp_path / "x"),
            ]
        )


def test_card_preset_gives_the_card_stage():
    from nanogpt.commands.distill import build_parser, resolve_train_config

    args = build_parser().parse_args(["--teacher", "t", "--out", "/nonexistent/o", "--preset", "card"])
    cfg = resolve_train_config(args)
    assert (cfg.max_iters, cfg.learning_rate, cfg.distill_alpha) == (15000, 3e-5, 0.5)
