"""`--optimizer muon`: Muon takes the blocks' weight matrices and AdamW the rest; a run resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nanogpt.cli import main as cli_main
from nanogpt.config import TrainConfig
from nanogpt.errors import UserError
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.loop import train
from nanogpt.train.optim import Muon, MuonAdamW, make_optimizer, orthogonalize
from nanogpt.train.plot import read_log
from tests.tiny import quick_train_config, tiny_config


def test_muon_takes_the_block_matrices_and_adamw_everything_else():
    model = NanoGPTLMHeadModel(tiny_config())
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    muon, adamw = opt.parts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    blocks = {
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("transformer.blocks.")
    }
    assert in_muon == blocks and len(blocks) == 4 * 2  # qkv, out, fc1, fc2 in each of 2 layers
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == set(names.values())
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    assert muon.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"  # the AdamW lr fits both
    assert len(opt.param_groups) == 3 and opt.param_groups[0] is muon.param_groups[0]
    # its Newton-Schulz iteration: fp32 on a CPU (bf16 is emulated on most), bf16 on an accelerator
    assert isinstance(muon, Muon) and muon.ns_dtype == torch.float32
    on_gpu = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cuda")).parts[0]
    assert isinstance(on_gpu, Muon) and on_gpu.ns_dtype == torch.bfloat16


def test_muon_in_bf16_steps_exactly_as_torch_and_in_fp32_close_to_it():
    torch.manual_seed(0)
    shapes = [(64, 32), (16, 48)]  # tall and wide: the iteration runs on the wide orientation
    start = [torch.randn(s) for s in shapes]
    kw = {"lr": 0.02, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}
    runs = {}
    for name, make in {
        "torch": lambda ps: torch.optim.Muon(ps, **kw),
        "bf16": lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **kw),
        "fp32": lambda ps: Muon(ps, ns_dtype=torch.float32, **kw),
        "original": lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **{**kw, "adjust_lr_fn": None}),
        "torch original": lambda ps: torch.optim.Muon(ps, **{**kw, "adjust_lr_fn": None}),
    }.items():
        params = [nn.Parameter(w.clone()) for w in start]
        opt = make(params)
        g = torch.Generator().manual_seed(1)  # the same gradients for every run
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs[name] = [p.detach() for p in params]
        assert set(opt.state[params[0]]) == {"momentum_buffer"}  # torch's state: its checkpoints load
    for ours, theirs in (("bf16", "torch"), ("original", "torch original")):
        assert all(torch.equal(a, b) for a, b in zip(runs[ours], runs[theirs], strict=True))
    moved = [(a - w).abs().max() for a, w in zip(runs["torch"], start, strict=True)]
    for a, b, m in zip(runs["fp32"], runs["torch"], moved, strict=True):
        assert 0 < (a - b).abs().max() < 0.05 * m  # bf16's rounding, a few % of how far the weights moved


def test_orthogonalize_flattens_the_spectrum_in_either_dtype():
    torch.manual_seed(0)
    m = torch.randn(96, 40) @ torch.diag(torch.logspace(-1, 1, 40))  # singular values over 2 decades
    for dtype in (torch.float32, torch.bfloat16):
        x = orthogonalize(m, (3.4445, -4.7750, 2.0315), 5, 1e-7, dtype)
        assert x.shape == m.shape and x.dtype == dtype
        s = torch.linalg.svdvals(x.float())
        assert s.min() > 0.6 and s.max() < 1.3  # all near 1 (the quintic leaves them in about 0.7..1.2)


def test_muon_run_learns_and_resumes_exactly(small_data, tmp_path):
    # constant lr: the resumed half's schedule is the same whatever max_iters the first half had
    cfg = quick_train_config(optimizer="muon", learning_rate=3e-3, min_lr=3e-3, warmup_iters=0, max_iters=8)
    model_cfg = tiny_config(context_length=32)
    train(model_cfg, cfg, small_data, tmp_path / "whole", progress=False)
    half = TrainConfig(**{**cfg.to_dict(), "max_iters": 4})
    train(model_cfg, half, small_data, tmp_path / "halves", progress=False)
    train(model_cfg, cfg, small_data, tmp_path / "halves", progress=False, resume=True)

    def losses(run):
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_log(run / "log.jsonl")]

    whole = losses(tmp_path / "whole")
    assert losses(tmp_path / "halves") == whole  # ==: Muon's momentum buffers came back exactly
    train_losses = [loss for _, loss, _ in whole if loss is not None]
    assert train_losses[-1] < train_losses[0] - 0.2  # it learns
    saved = json.loads((tmp_path / "whole" / "last" / "state.json").read_text())["optimizer"]
    assert "momentum" in saved["param_groups"][0] and "betas" in saved["param_groups"][1]


def test_resuming_an_adamw_run_with_muon_is_one_line(small_data, tmp_path):
    cfg = quick_train_config(max_iters=2)
    train(tiny_config(context_length=32), cfg, small_data, tmp_path / "run", progress=False)
    muon = TrainConfig(**{**cfg.to_dict(), "optimizer": "muon", "max_iters": 4})
    with pytest.raises(UserError, match="optimizer state does not fit"):
        train(tiny_config(context_length=32), muon, small_data, tmp_path / "run", progress=False, resume=True)


def test_unknown_optimizer_is_refused_by_the_cli_and_the_config(capsys):
    assert cli_main(["train", "--optimizer", "sgd", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "--optimizer" in err and "'sgd'" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError, match="optimizer='lion' is unknown; use one of adamw, muon"):
        TrainConfig(optimizer="lion")
