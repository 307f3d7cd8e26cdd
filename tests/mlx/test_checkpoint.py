"""MLX checkpoints: the shared format both ways (identical tensors, tied head stored once) and the MLX
training state (`state.safetensors` + `state.json`) saved and loaded back exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="MLX is not installable here (pip install 'mlx[cpu]' on Linux)")

from mlx.utils import tree_flatten  # noqa: E402

from nanogpt.config import TrainConfig  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.mlx.model import NanoGPTLMHeadModel as MLXGPT  # noqa: E402
from nanogpt.mlx.train.checkpoint import (  # noqa: E402
    load_train_state,
    load_weights,
    model_state,
    save_model,
    save_train_state,
)
from nanogpt.mlx.train.optim import make_optimizer, make_train_step  # noqa: E402
from nanogpt.train import checkpoint as torch_checkpoint  # noqa: E402
from tests.mlx import torch_and_mlx  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402


def test_checkpoints_cross_load_with_identical_tensors(tiny_cfg, tmp_path):
    for cfg in (tiny_cfg, tiny_config(tie_embeddings=False)):
        tm, mm = torch_and_mlx(cfg, tmp_path)  # torch -> MLX
        for name, t in tm.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_embeddings:
                name = "transformer.token_embedding.weight"
            assert np.array_equal(np.array(model_state(mm)[name]), t.numpy()), name
        mx.random.seed(5)
        fresh = MLXGPT(cfg)  # MLX -> torch
        save_model(tmp_path / "mlx_ckpt", fresh)
        back = torch_checkpoint.load_model(tmp_path / "mlx_ckpt")
        sd = back.state_dict()
        for name, a in model_state(fresh).items():
            assert np.array_equal(sd[name].numpy(), np.array(a)), name
        if cfg.tie_embeddings:  # re-tied on load, stored once in the file
            assert back.lm_head.weight is back.transformer.token_embedding.weight
            assert "lm_head.weight" not in torch_checkpoint.load_weights(tmp_path / "mlx_ckpt")
        torch_names = set(torch_checkpoint.load_weights(tmp_path / "torch_ckpt"))
        assert set(load_weights(tmp_path / "mlx_ckpt")) == torch_names
        assert json.loads((tmp_path / "mlx_ckpt" / "config.json").read_text()) == cfg.to_dict()


def test_train_state_loads_back_exactly(tmp_path):
    cfg, tc = tiny_config(context_length=8), TrainConfig(batch_size=2)
    mx.random.seed(0)
    model = MLXGPT(cfg)
    opt = make_optimizer(model, tc)
    opt.learning_rate = 1e-3
    x = mx.array(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 2, 8)).astype(np.int32))
    step = make_train_step(model, opt, tc)
    for _ in range(2):  # moments and step counts that differ from a fresh optimizer's
        step(x, x)
    mx.eval(opt.state)
    tmp_path.joinpath("last").mkdir()
    save_train_state(tmp_path / "last", opt, {"step": 2, "sampler": {"k": 1}})
    assert json.loads((tmp_path / "last" / "state.json").read_text()) == {
        "backend": "mlx",
        "step": 2,
        "sampler": {"k": 1},
    }
    fresh = make_optimizer(MLXGPT(cfg), tc)
    info = load_train_state(tmp_path / "last", fresh)
    assert info["step"] == 2
    saved, loaded = dict(tree_flatten(opt.state)), dict(tree_flatten(fresh.state))
    assert set(saved) == set(loaded) and any(k.endswith(".step") for k in saved)
    for name, a in saved.items():
        assert a.dtype == loaded[name].dtype and np.array_equal(np.array(a), np.array(loaded[name])), name
    # another model's optimizer does not fit, and the refusal names the fix
    with pytest.raises(UserError, match="run's own config"):
        load_train_state(tmp_path / "last", make_optimizer(MLXGPT(tiny_config(n_layers=1)), tc))


def test_train_state_of_the_torch_trainer_is_refused(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"step": 4}))  # what the torch trainer writes: no backend
    opt = make_optimizer(MLXGPT(tiny_config()), TrainConfig())
    with pytest.raises(UserError, match="PyTorch trainer.*torch backend"):
        load_train_state(tmp_path, opt)


def test_missing_weights_are_one_line(tmp_path):
    with pytest.raises(UserError, match="model.safetensors not found"):
        load_weights(tmp_path)
