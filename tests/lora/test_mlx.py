"""LoRA in MLX against PyTorch: the same adapter tensors on the same base give the same loss (within 1e-5),
adapter files written by either backend load in the other, and an MLX LoRA run resumes exactly."""

from __future__ import annotations

import pytest
import torch

mx = pytest.importorskip("mlx.core", reason="MLX is not installable here (pip install 'mlx[cpu]' on Linux)")

from mlx.utils import tree_flatten  # noqa: E402

from nanogpt.data.shards import BatchSampler, TokenData  # noqa: E402
from nanogpt.mlx.lora import adapter_state as mlx_adapters  # noqa: E402
from nanogpt.mlx.lora import apply_lora as mlx_apply  # noqa: E402
from nanogpt.mlx.lora import load_adapter_state as mlx_load_adapters  # noqa: E402
from nanogpt.mlx.lora import trainable_count as mlx_trainable  # noqa: E402
from nanogpt.mlx.model import NanoGPTLMHeadModel as MLXGPT  # noqa: E402
from nanogpt.mlx.train.checkpoint import load_model as mlx_load_model  # noqa: E402
from nanogpt.mlx.train.checkpoint import load_state_into as mlx_load_state  # noqa: E402
from nanogpt.mlx.train.loop import train as mlx_train  # noqa: E402
from nanogpt.mlx.train.optim import cross_entropy_loss as mlx_loss  # noqa: E402
from nanogpt.mlx.train.optim import to_mx  # noqa: E402
from nanogpt.model.lora import LoRASpec, adapter_state, apply_lora, trainable_count  # noqa: E402
from nanogpt.train.checkpoint import load_model, load_weights  # noqa: E402
from nanogpt.train.optim import cross_entropy_loss  # noqa: E402
from nanogpt.train.plot import read_log  # noqa: E402
from tests.tiny import quick_train_config, tiny_config  # noqa: E402

SPEC = LoRASpec(4, 16.0, 0.0, ("qkv_proj", "out_proj", "fc1", "fc2"))


def _pair(base):
    """The base in both backends, LoRA applied, the torch adapters (B random) copied into MLX."""
    torch.manual_seed(1)
    tm = apply_lora(load_model(base), SPEC).eval()
    for m in tm.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    mm = MLXGPT(tiny_config())
    mlx_load_state(mm, {k: mx.array(v.numpy()) for k, v in load_weights(base).items()}, base)
    mlx_apply(mm, SPEC)
    mlx_load_adapters(mm, {k: mx.array(v.numpy()) for k, v in adapter_state(tm).items()})
    mm.eval()
    return tm, mm


def test_mlx_and_torch_adapter_losses_agree(base, small_data):
    tm, mm = _pair(base)
    assert mlx_trainable(mm) == trainable_count(tm)
    x, y = BatchSampler(list(TokenData(small_data).split("val")), 4, 64, 0).next()
    with torch.no_grad():
        want = float(cross_entropy_loss(tm, x, y))
    xs, ys = to_mx([(x, y)])
    got = mlx_loss(mm, xs[0], ys[0]).item()
    assert abs(got - want) < 1e-5, (got, want)
    names = set(adapter_state(tm))
    assert set(mlx_adapters(mm)) == names


def test_adapter_files_load_in_either_backend(base, lora_run, small_data, tmp_path):
    """The torch run's adapters through the MLX loader, an MLX run's through the torch loader: same weights."""
    torch_merged = load_model(lora_run)
    mlx_merged = mlx_load_model(lora_run)
    flat = dict(tree_flatten(mlx_merged.parameters()))
    for k, v in torch_merged.state_dict().items():
        if k in flat:
            torch.testing.assert_close(torch.tensor(flat[k].tolist()), v, atol=1e-6, rtol=0)
    out = tmp_path / "mlx-run"
    cfg = quick_train_config(lora_rank=4, learning_rate=1e-2, weight_decay=0.0, max_iters=4)
    mlx_train(tiny_config(), cfg, small_data, out, init_from=str(base), progress=False)
    assert {p.name for p in (out / "last").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    flat = dict(tree_flatten(mlx_load_model(out).parameters()))
    for k, v in load_model(out).state_dict().items():
        if k in flat:
            torch.testing.assert_close(torch.tensor(flat[k].tolist()), v, atol=1e-6, rtol=0)


def test_mlx_lora_resume_is_exact(base, small_data, tmp_path):
    cfg = quick_train_config(lora_rank=4, learning_rate=1e-2, weight_decay=0.0, lr_decay_iters=8)
    mlx_train(tiny_config(), cfg, small_data, tmp_path / "whole", init_from=str(base), progress=False)
    half = quick_train_config(
        lora_rank=4, learning_rate=1e-2, weight_decay=0.0, lr_decay_iters=8, max_iters=4
    )
    mlx_train(tiny_config(), half, small_data, tmp_path / "split", init_from=str(base), progress=False)
    mlx_train(tiny_config(), cfg, small_data, tmp_path / "split", resume=True, progress=False)
    whole = [(r["step"], r.get("loss")) for r in read_log(tmp_path / "whole" / "log.jsonl")]
    split = [(r["step"], r.get("loss")) for r in read_log(tmp_path / "split" / "log.jsonl")]
    assert split == whole
