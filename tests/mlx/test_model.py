"""The MLX network against PyTorch: logits (tiny variants and the card's exact config), parameter names,
and the KV cache against a full forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core", reason="MLX is not installable here (pip install 'mlx[cpu]' on Linux)")

from nanogpt.config import preset  # noqa: E402
from nanogpt.mlx.kv_cache import KVCache  # noqa: E402
from nanogpt.mlx.model import NanoGPTLMHeadModel as MLXGPT  # noqa: E402
from nanogpt.mlx.train.checkpoint import model_state  # noqa: E402
from nanogpt.model.gpt import NanoGPTLMHeadModel as TorchGPT  # noqa: E402
from tests.mlx import torch_and_mlx  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402


def max_logit_diff(tm, mm, idx: np.ndarray) -> float:
    with torch.no_grad():
        lt = tm(torch.from_numpy(idx)).numpy()
    lm = np.array(mm(mx.array(idx.astype(np.int32))))
    assert lt.shape == lm.shape
    return float(np.abs(lt - lm).max())


@pytest.mark.parametrize(
    "changes",
    [{}, {"norm_position": "post", "activation": "gelu_tanh", "tie_embeddings": False}, {"bias": False}],
    ids=["pre-ln-tied", "post-ln-gelu_tanh-untied", "no-bias"],
)
def test_logits_match_torch_tiny(tmp_path, changes):
    cfg = tiny_config(**changes)
    tm, mm = torch_and_mlx(cfg, tmp_path)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    assert max_logit_diff(tm, mm, idx) < 1e-4


def test_logits_match_torch_card(tmp_path):
    cfg = preset("card")
    tm, mm = torch_and_mlx(cfg, tmp_path)
    assert mm.num_params(unique=False) == tm.num_params(unique=False) == 52_990_464
    idx = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 12))
    assert max_logit_diff(tm, mm, idx) < 1e-4


def test_parameter_names_are_the_torch_names(tiny_cfg):
    mm = MLXGPT(tiny_cfg)
    torch_names = set(TorchGPT(tiny_cfg).state_dict()) - {"lm_head.weight"}
    assert set(model_state(mm)) == torch_names


def test_cached_equals_uncached(tiny_cfg):
    mx.random.seed(0)
    mm = MLXGPT(tiny_cfg)
    mm.eval()
    idx = mx.array(np.random.default_rng(2).integers(0, tiny_cfg.vocab_size, (2, 20)).astype(np.int32))
    full = mm(idx)
    cache = KVCache.for_model(tiny_cfg, batch_size=2)
    parts = [mm(idx[:, :9], cache=cache), mm(idx[:, 9:15], cache=cache)]  # prefill, then a chunk
    parts += [mm(idx[:, t : t + 1], cache=cache) for t in range(15, 20)]  # then one token at a time
    assert cache.pos == 20
    assert float(mx.abs(mx.concatenate(parts, axis=1) - full).max()) < 1e-5
