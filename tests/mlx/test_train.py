"""The MLX trainer against PyTorch's: decay groups, 20 compiled steps against the torch step, exact resume,
the shared result and counter types, and its refusals."""

from __future__ import annotations

import json
import time
from dataclasses import fields

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core", reason="MLX is not installable here (pip install 'mlx[cpu]' on Linux)")

from nanogpt.config import TrainConfig  # noqa: E402
from nanogpt.data.shards import BatchSampler, TokenData  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.mlx.model import NanoGPTLMHeadModel as MLXGPT  # noqa: E402
from nanogpt.mlx.train.checkpoint import load_model, load_optimizer_arrays, optimizer_arrays  # noqa: E402
from nanogpt.mlx.train.loop import train  # noqa: E402
from nanogpt.mlx.train.optim import decay_names, make_optimizer, make_train_step, to_mx  # noqa: E402
from nanogpt.model.gpt import NanoGPTLMHeadModel as TorchGPT  # noqa: E402
from nanogpt.train import checkpoint as torch_checkpoint  # noqa: E402
from nanogpt.train.loop import Counters, TrainResult  # noqa: E402
from nanogpt.train.optim import (  # noqa: E402
    backward_micro_batches,
    cross_entropy_loss,
    lr_at,
    optimizer_step,
    param_groups,
)
from nanogpt.train.optim import make_optimizer as torch_optimizer  # noqa: E402
from nanogpt.train.plot import read_log  # noqa: E402
from tests.mlx import torch_and_mlx  # noqa: E402
from tests.tiny import quick_train_config, tiny_config  # noqa: E402


def test_decay_groups_match_torch(tiny_cfg):
    for cfg in (tiny_cfg, tiny_config(tie_embeddings=False)):
        tm = TorchGPT(cfg)
        names = {id(p): n for n, p in tm.named_parameters()}
        torch_decay = {names[id(p)] for p in param_groups(tm, 0.1)[0]["params"]}
        assert decay_names(MLXGPT(cfg)) == torch_decay


def test_twenty_training_steps_match_torch(small_data, tmp_path):
    cfg = tiny_config(context_length=16)
    tc = TrainConfig(
        batch_size=2, grad_accum_steps=2, learning_rate=5e-3, min_lr=5e-4, warmup_iters=5, max_iters=20
    )
    tm, mm = torch_and_mlx(cfg, tmp_path, seed=11)
    sampler = BatchSampler(TokenData(small_data).split("train"), tc.batch_size, cfg.context_length, seed=3)
    steps = [[sampler.next() for _ in range(tc.grad_accum_steps)] for _ in range(tc.max_iters)]
    # PyTorch: the trainer's own pieces
    tm.train()
    t_opt = torch_optimizer(tm, tc, torch.device("cpu"))
    torch_losses = []
    t0 = time.perf_counter()
    for i, batches in enumerate(steps):
        torch_losses.append(
            float(backward_micro_batches(tm, batches, cross_entropy_loss, torch.device("cpu")))
        )
        optimizer_step(tm, t_opt, lr_at(i + 1, tc), tc.grad_clip)
    # MLX: the trainer's compiled step
    t1 = time.perf_counter()
    mm.train()
    m_opt = make_optimizer(mm, tc)
    step = make_train_step(mm, m_opt, tc)
    mlx_losses = []
    for i, batches in enumerate(steps):
        m_opt.learning_rate = lr_at(i + 1, tc)
        loss, _ = step(*to_mx(batches))
        mlx_losses.append(loss.item())
    print(f"torch {t1 - t0:.1f}s mlx {time.perf_counter() - t1:.1f}s")
    diff = np.abs(np.array(torch_losses) - np.array(mlx_losses))
    assert torch_losses[-1] < torch_losses[0] - 0.3  # the run really trains (grad clipping is active early)
    print(f"max |loss diff| over {tc.max_iters} steps: {diff.max():.2e}")
    assert diff.max() < 1e-3, diff


def test_resume_is_exact(small_data, tmp_path):
    cfg = tiny_config(context_length=32, dropout=0.1)
    common = dict(
        batch_size=2, learning_rate=2e-3, warmup_iters=2, lr_decay_iters=6, eval_interval=3, eval_iters=1
    )
    kw = dict(progress=False)
    full = train(cfg, TrainConfig(max_iters=6, log_interval=1, **common), small_data, tmp_path / "a", **kw)
    train(cfg, TrainConfig(max_iters=3, log_interval=1, **common), small_data, tmp_path / "b", **kw)
    # the optimizer state saved at step 3 loads back exactly
    saved = mx.load(str(tmp_path / "b" / "last" / "state.safetensors"))
    opt = make_optimizer(load_model(tmp_path / "b"), TrainConfig(**common))
    load_optimizer_arrays(opt, saved)
    now = optimizer_arrays(opt)
    assert set(now) == set(saved) and int(now["mlx_optimizer.states.0.step"].item()) == 3
    assert all(np.array_equal(np.array(now[k]), np.array(saved[k])) for k in saved)
    resumed = train(
        cfg, TrainConfig(max_iters=6, log_interval=1, **common), small_data, tmp_path / "b", resume=True, **kw
    )
    assert resumed.steps == full.steps == 6
    losses = [[(r["step"], r.get("loss")) for r in read_log(tmp_path / run / "log.jsonl")] for run in "ab"]
    assert losses[0] == losses[1]  # bit-identical, dropout included
    assert resumed.best_val_loss == full.best_val_loss
    assert (tmp_path / "b" / "best" / "model.safetensors").is_file()
    torch_checkpoint.load_model(tmp_path / "b")  # the torch side reads an MLX run


def test_result_and_counters_are_the_torch_types(small_data, tmp_path):
    """One `TrainResult` and one `Counters` for both backends; state.json keeps the MLX key order."""
    tc = quick_train_config(max_iters=4, eval_interval=2, log_interval=2)
    result = train(tiny_config(context_length=32), tc, small_data, tmp_path / "run", progress=False)
    assert type(result) is TrainResult
    assert (result.steps, result.tokens, result.run_dir) == (4, 4 * 2 * 32, tmp_path / "run")
    assert result.first_val_loss > result.best_val_loss == result.last_val_loss
    assert result.best_val_ppl == pytest.approx(np.exp(result.best_val_loss))
    state = json.loads((tmp_path / "run" / "last" / "state.json").read_text())
    assert list(state) == [
        "backend",
        "step",
        "elapsed",
        "best_val_loss",
        "first_val_loss",
        "last_val_loss",
        "tokens",
        "sampler",
        "train_config",
        "data_dir",
    ]
    counters = Counters(**{f.name: state[f.name] for f in fields(Counters)})
    assert counters.step == 4 and counters.best_val_loss == result.best_val_loss
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert [r["step"] for r in log] == [0, 2, 4]
    assert set(log[1]) == {"step", "loss", "lr", "tokens", "tokens_per_s", "mfu", "grad_norm", "elapsed"} | {
        "val_loss",
        "val_ppl",
    }


def test_train_refuses_bad_input(tiny_cfg, small_data, tmp_path):
    with pytest.raises(UserError, match="fp32"):
        train(tiny_cfg, TrainConfig(dtype="bf16"), small_data, tmp_path / "x", progress=False)
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "log.jsonl").write_text("")
    with pytest.raises(UserError, match="did not write.*--force"):  # the same folder rule as torch's trainer
        train(tiny_cfg, TrainConfig(), small_data, tmp_path / "y", progress=False)
    assert [p.name for p in (tmp_path / "y").iterdir()] == ["log.jsonl"]


def test_out_of_memory_names_the_settings_that_fit(small_data, tmp_path):
    """MLX's allocator failing (Metal: "[metal::malloc] ..."; CPU: MemoryError) is the torch trainer's answer."""

    def oom(model, x, y):
        raise RuntimeError(
            "[metal::malloc] Attempting to allocate 21474836480 bytes which is greater than the maximum"
        )

    tc = quick_train_config(batch_size=4, grad_accum_steps=2)
    with pytest.raises(
        UserError,
        match=r"out of memory at step 1 .*try --batch-size 2 --grad-accum-steps 4 \(same tokens per step\)$",
    ):
        train(tiny_config(context_length=32), tc, small_data, tmp_path / "r", loss_fn=oom, progress=False)
