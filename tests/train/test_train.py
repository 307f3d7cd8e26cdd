"""The trainer: schedule, parameter groups, accumulation, a real short run, errors, and the CLI."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from nanogpt import cli
from nanogpt.commands.train import build_parser, resolve_configs
from nanogpt.config import ModelConfig, TrainConfig, first_difference
from nanogpt.data.shards import BatchSampler, TokenData
from nanogpt.errors import UserError
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import load_model, load_train_state, save_train_state
from nanogpt.train.loop import TrainResult, estimate_loss, train
from nanogpt.train.optim import (
    backward_micro_batches,
    cross_entropy_loss,
    flops_per_token,
    lr_at,
    make_optimizer,
    optimizer_step,
    param_groups,
)
from nanogpt.train.plot import read_log
from tests.tiny import quick_train_config, tiny_config

CPU = torch.device("cpu")


# --- the math ---------------------------------------------------------------------------------------------


def test_lr_at_warmup_cosine_and_floor():
    cfg = TrainConfig(learning_rate=3e-4, min_lr=3e-5, warmup_iters=100, max_iters=1100)
    assert lr_at(0, cfg) == 0.0
    assert lr_at(50, cfg) == pytest.approx(1.5e-4)
    assert lr_at(100, cfg) == pytest.approx(3e-4)  # warmup ends at the peak
    assert lr_at(600, cfg) == pytest.approx((3e-4 + 3e-5) / 2)  # half way down the cosine
    assert lr_at(350, cfg) == pytest.approx(3e-5 + 0.5 * (1 + math.cos(math.pi / 4)) * 2.7e-4)
    assert lr_at(1100, cfg) == pytest.approx(3e-5)
    assert lr_at(5000, cfg) == 3e-5  # flat floor after the decay
    decay = TrainConfig(learning_rate=1.0, min_lr=0.0, warmup_iters=0, lr_decay_iters=10, max_iters=100)
    assert lr_at(0, decay) == 1.0 and lr_at(5, decay) == pytest.approx(0.5) and lr_at(50, decay) == 0.0


def test_card_recipe_is_the_default():
    cfg = TrainConfig()
    assert (cfg.learning_rate, cfg.batch_size, cfg.max_iters, cfg.weight_decay) == (3e-4, 12, 20000, 0.1)
    args = build_parser().parse_args(["--out", "r", "--preset", "card"])
    model_cfg, train_cfg = resolve_configs(args)
    assert train_cfg == TrainConfig() and model_cfg == ModelConfig()
    args = build_parser().parse_args(
        [
            "--out",
            "r",
            "--preset",
            "tiny",
            "--max-iters",
            "1e3",
            "--compile",
            "--dropout",
            "0.2",
            "--max-time",
            "60",
        ]
    )
    model_cfg, train_cfg = resolve_configs(args)
    assert train_cfg.max_iters == 1000 and train_cfg.compile and train_cfg.max_time == 60.0
    assert model_cfg.dropout == 0.2 and model_cfg.d_model == 128
    assert train_cfg.learning_rate == 8e-3  # unset flags keep the value of the preset's recipe
    assert train_cfg.warmup_iters == 50  # the small presets' warmup follows --max-iters (5%)
    args = build_parser().parse_args(["--out", "r"])  # no preset: the card's model and recipe
    assert resolve_configs(args) == (ModelConfig(), TrainConfig())


def test_param_groups_decay_only_linear_weights_each_param_once(tiny_cfg):
    model = NanoGPTLMHeadModel(tiny_cfg)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = sorted(names[id(p)] for p in decay["params"])
    assert len(decay_names) == 4 * tiny_cfg.n_layers
    assert all(
        n.endswith(("qkv_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight")) for n in decay_names
    )
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "transformer.token_embedding.weight" in no_decay_names  # = the tied lm_head
    assert "transformer.position_embedding.weight" in no_decay_names
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params(unique=True)
    untied = NanoGPTLMHeadModel(tiny_config(tie_embeddings=False))
    assert any(p is untied.lm_head.weight for p in param_groups(untied, 0.1)[0]["params"])


def test_flops_per_token_formula(tiny_cfg):
    n = NanoGPTLMHeadModel(tiny_cfg).num_params(unique=True)
    c = tiny_cfg
    expected = 6 * (n - c.context_length * c.d_model) + 12 * c.n_layers * c.context_length * c.d_model
    assert flops_per_token(c, n) == expected


def test_two_accumulated_micro_batches_equal_one_batch(tiny_cfg, small_data):
    torch.manual_seed(0)
    a = NanoGPTLMHeadModel(tiny_cfg)
    b = copy.deepcopy(a)
    x, y = BatchSampler(TokenData(small_data).split("train"), 12, 16, seed=1).next()
    cfg = quick_train_config(weight_decay=0.1)
    opt_a, opt_b = make_optimizer(a, cfg, CPU), make_optimizer(b, cfg, CPU)
    loss_a = backward_micro_batches(a, [(x[:6], y[:6]), (x[6:], y[6:])], cross_entropy_loss, CPU)
    loss_b = backward_micro_batches(b, [(x, y)], cross_entropy_loss, CPU)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=name)
    optimizer_step(a, opt_a, 1e-3, 1.0)
    optimizer_step(b, opt_b, 1e-3, 1.0)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
        assert pa.grad is None  # zeroed for the next step


def test_eval_uses_the_same_windows_every_time(tiny_cfg, small_data):
    model = NanoGPTLMHeadModel(tiny_cfg)
    val = TokenData(small_data).split("val")
    kw = dict(batch_size=2, context_length=64, iters=2, device=CPU)
    assert estimate_loss(model, val, **kw) == estimate_loss(model, val, **kw)
    assert model.training  # left as found


def test_optimizer_state_round_trips_exactly(tiny_cfg, tmp_path):
    model = NanoGPTLMHeadModel(tiny_cfg)
    opt = make_optimizer(model, quick_train_config(), CPU)
    model(torch.randint(0, 100, (2, 8))).sum().backward()
    opt.step()
    save_train_state(tmp_path, opt, {"rng": torch.get_rng_state()}, {"step": 1})
    fresh = make_optimizer(model, quick_train_config(), CPU)
    state = load_train_state(tmp_path, fresh)
    assert state.info["step"] == 1 and torch.equal(state.tensors["rng"], torch.get_rng_state())
    saved, loaded = opt.state_dict()["state"], fresh.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for i in saved:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(saved[i][key], loaded[i][key]), (i, key)
    assert fresh.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


# --- real runs -------------------------------------------------------------------------------------------


SHORT_RUN_MODEL = tiny_config(context_length=32)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, small_data) -> TrainResult:
    """30 steps of SHORT_RUN_MODEL at lr 1e-3 on real text."""
    run = tmp_path_factory.mktemp("runs") / "short"
    train_cfg = quick_train_config(max_iters=30, eval_interval=10, eval_iters=2, batch_size=4, warmup_iters=5)
    return train(SHORT_RUN_MODEL, train_cfg, small_data, run, progress=False)


def test_short_run_lowers_val_loss_and_writes_the_run_folder(short_run):
    result = short_run
    run = result.run_dir
    assert result.steps == 30 and result.tokens == 30 * 4 * 32
    assert result.last_val_loss < result.first_val_loss - 0.2
    assert result.best_val_loss == result.last_val_loss
    assert result.best_val_ppl == pytest.approx(math.exp(result.best_val_loss))
    for f in (
        "config.json",
        "train_config.json",
        "log.jsonl",
        "loss.png",
        "last/model.safetensors",
        "last/state.safetensors",
        "last/state.json",
        "best/model.safetensors",
    ):
        assert (run / f).is_file(), f
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_log(run / "log.jsonl")
    assert [r["step"] for r in records] == list(range(31))
    assert [r["step"] for r in records if "val_loss" in r] == [0, 10, 20, 30]
    assert all(k in records[5] for k in ("loss", "lr", "tokens", "tokens_per_s", "mfu"))
    assert records[5]["tokens"] == 5 * 4 * 32
    assert load_model(run).config == SHORT_RUN_MODEL
    state = json.loads((run / "last" / "state.json").read_text())
    assert state["step"] == 30 and state["train_config"]["max_iters"] == 30


def test_plot_flag_regenerates_the_curve(short_run):
    run = short_run.run_dir
    (run / "loss.png").unlink()
    assert cli.main(["train", "--plot", str(run)]) == 0
    assert (run / "loss.png").stat().st_size > 1000


def test_init_from_starts_from_the_checkpoint(short_run, small_data, tmp_path):
    result = short_run
    res = train(
        SHORT_RUN_MODEL,
        quick_train_config(max_iters=0, batch_size=4, eval_iters=2),
        small_data,
        tmp_path / "ft",
        init_from=str(result.run_dir),
        progress=False,
    )
    assert res.first_val_loss == pytest.approx(result.best_val_loss, abs=1e-4)  # same weights, same windows


def test_max_tokens_and_max_time_stop_the_run(small_data, tmp_path):
    cfg = tiny_config(context_length=32)
    res = train(
        cfg,
        quick_train_config(max_iters=100, max_tokens=3 * 2 * 32),
        small_data,
        tmp_path / "a",
        progress=False,
    )
    assert res.steps == 3 and res.tokens == 3 * 2 * 32
    res = train(
        cfg, quick_train_config(max_iters=100, max_time=0.0), small_data, tmp_path / "b", progress=False
    )
    assert res.steps == 1 and (tmp_path / "b" / "last").is_dir()


def test_existing_run_folder_needs_resume(short_run, small_data, capsys):
    run = short_run.run_dir
    rc = cli.main(["train", "--data", str(small_data), "--out", str(run), "--preset", "tiny"])
    err = capsys.readouterr().err.strip()
    assert (
        rc == 2 and "--resume" in err and "already holds a training run" in err and len(err.splitlines()) == 1
    )


def test_resume_with_another_config_names_the_key(short_run, small_data):
    result = short_run
    other = replace(SHORT_RUN_MODEL, n_layers=3)
    with pytest.raises(UserError, match="'n_layers'"):
        train(other, quick_train_config(), small_data, result.run_dir, resume=True, progress=False)
    assert first_difference({"a": 1, "b": 2}, {"a": 1, "b": 3}) == "b"


def test_nan_loss_stops_naming_the_step_and_keeps_last(small_data, tmp_path):
    calls = {"n": 0}

    def nan_at_step_6(model, x, y):
        calls["n"] += 1
        loss = cross_entropy_loss(model, x, y)
        return loss * float("nan") if calls["n"] == 6 else loss

    run = tmp_path / "nan"
    with pytest.raises(UserError, match="at step 6"):
        train(
            tiny_config(context_length=32),
            quick_train_config(),
            small_data,
            run,
            loss_fn=nan_at_step_6,
            progress=False,
        )
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 4
    assert torch.isfinite(next(load_model(run / "last").parameters())).all()
    assert max(r["step"] for r in read_log(run / "log.jsonl")) == 5


def test_huge_learning_rate_is_a_user_error(small_data, tmp_path):
    cfg = quick_train_config(learning_rate=1e30, warmup_iters=0, grad_clip=0.0)
    with pytest.raises(UserError, match=r"(loss|gradient norm) is (nan|inf) at step \d"):
        train(tiny_config(context_length=32), cfg, small_data, tmp_path / "r", progress=False)


def test_out_of_memory_suggests_accumulation(small_data, tmp_path):
    def oom(model, x, y):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    fits = r"try --batch-size 1 --grad-accum-steps 2 \(same tokens per step\) or --dtype bf16"
    with pytest.raises(UserError, match="out of memory at step 1 .*" + fits):
        train(
            tiny_config(context_length=32),
            quick_train_config(batch_size=2),
            small_data,
            tmp_path / "r",
            loss_fn=oom,
            progress=False,
        )


def test_missing_data_folder_is_a_user_error(tiny_cfg, tmp_path):
    with pytest.raises(UserError, match="nanogpt prepare"):
        train(tiny_cfg, quick_train_config(), tmp_path / "nowhere", tmp_path / "r", progress=False)


def test_bf16_autocast_trains_on_cpu(small_data, tmp_path):
    res = train(
        tiny_config(context_length=32),
        quick_train_config(max_iters=2, dtype="bf16"),
        small_data,
        tmp_path / "r",
        progress=False,
    )
    records = read_log(tmp_path / "r" / "log.jsonl")
    assert res.steps == 2 and all(math.isfinite(r["loss"]) for r in records[1:])
    assert next(load_model(tmp_path / "r").parameters()).dtype == torch.float32  # weights stay fp32
