"""The MLX backend against PyTorch: logits, KV cache, checkpoints both ways, 20 training steps, resume.

MLX's Linux CPU build is slow (reference BLAS), so inputs are short and batches small; parity is
checked at the tiny config and, for logits, at the card's exact config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core", reason="MLX is not installable here (pip install 'mlx[cpu]' on Linux)")

from nanogpt.config import ModelConfig, TrainConfig, preset  # noqa: E402
from nanogpt.data.shards import BatchSampler, TokenData  # noqa: E402
from nanogpt.mlx.checkpoint import load_mlx_model, load_mlx_weights, mlx_model_state, save_mlx_model  # noqa: E402
from nanogpt.mlx.generate import generate, sample_next, top_k_filter, top_p_filter  # noqa: E402
from nanogpt.mlx.kv_cache import KVCache  # noqa: E402
from nanogpt.mlx.model import NanoGPTLMHeadModel as MLXGPT  # noqa: E402
from nanogpt.mlx.train import (  # noqa: E402
    decay_names,
    load_optimizer_arrays,
    make_optimizer,
    make_train_step,
    optimizer_arrays,
    to_mx,
    train_mlx,
)
from nanogpt.model.gpt import NanoGPTLMHeadModel as TorchGPT  # noqa: E402
from nanogpt.train.checkpoint import load_model, load_weights, save_model  # noqa: E402
from nanogpt.train.optim import (  # noqa: E402
    backward_micro_batches,
    cross_entropy_loss,
    lr_at,
    optimizer_step,
    param_groups,
)
from nanogpt.train.optim import make_optimizer as torch_optimizer  # noqa: E402
from nanogpt.train.plot import read_log  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402


def torch_and_mlx(cfg: ModelConfig, tmp_path, seed: int = 0):
    """A random-init torch model and the same weights in MLX, through the shared checkpoint format."""
    torch.manual_seed(seed)
    tm = TorchGPT(cfg).eval()
    save_model(tmp_path / "torch_ckpt", tm)
    return tm, load_mlx_model(tmp_path / "torch_ckpt")


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
    assert set(mlx_model_state(mm)) == torch_names


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


def test_generate_greedy_equals_uncached_decoding():
    cfg = tiny_config(context_length=16)
    mx.random.seed(3)
    mm = MLXGPT(cfg)
    prompt = [464, 3290, 318]
    got = list(generate(mm, prompt, 10, temperature=0, stop_at_eot=False))
    seq = list(prompt)
    for _ in range(10):  # no cache: the whole sequence every step
        seq.append(int(mx.argmax(mm(mx.array([seq], dtype=mx.int32))[0, -1]).item()))
    assert got == seq[len(prompt) :]
    # past the 16-token context the window slides instead of failing
    assert len(list(generate(mm, prompt, 30, temperature=0, stop_at_eot=False))) == 30


def test_sampling_rules(tiny_cfg):
    logits = mx.array([[1.0, 3.0, 3.0, 2.0, 0.0]])
    kept = np.isfinite(np.array(top_k_filter(logits, 2)))
    assert kept.sum() == 2 and kept[0, 1] and kept[0, 2]  # exactly k, even with a tie at the k-th value
    probs = mx.array([[0.5, 0.3, 0.15, 0.05]])
    assert np.isfinite(np.array(top_p_filter(mx.log(probs), 0.8))).tolist() == [[True, True, False, False]]
    assert int(sample_next(mx.array([[0.0, 5.0, 1.0]]), temperature=0).item()) == 1
    mx.random.seed(0)
    mm = MLXGPT(tiny_cfg)
    a = list(generate(mm, [1, 2], 12, temperature=1.0, top_k=None, seed=7, stop_at_eot=False))
    b = list(generate(mm, [1, 2], 12, temperature=1.0, top_k=None, seed=7, stop_at_eot=False))
    c = list(generate(mm, [1, 2], 12, temperature=1.0, top_k=None, seed=8, stop_at_eot=False))
    assert a == b and a != c


def test_checkpoints_cross_load_with_identical_tensors(tiny_cfg, tmp_path):
    for cfg in (tiny_cfg, tiny_config(tie_embeddings=False)):
        tm, mm = torch_and_mlx(cfg, tmp_path)  # torch -> MLX
        for name, t in tm.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_embeddings:
                name = "transformer.token_embedding.weight"
            assert np.array_equal(np.array(mlx_model_state(mm)[name]), t.numpy()), name
        mx.random.seed(5)
        fresh = MLXGPT(cfg)  # MLX -> torch
        save_mlx_model(tmp_path / "mlx_ckpt", fresh)
        back = load_model(tmp_path / "mlx_ckpt")
        sd = back.state_dict()
        for name, a in mlx_model_state(fresh).items():
            assert np.array_equal(sd[name].numpy(), np.array(a)), name
        if cfg.tie_embeddings:  # re-tied on load, stored once in the file
            assert back.lm_head.weight is back.transformer.token_embedding.weight
            assert "lm_head.weight" not in load_weights(tmp_path / "mlx_ckpt")
        assert set(load_mlx_weights(tmp_path / "mlx_ckpt")) == set(load_weights(tmp_path / "torch_ckpt"))
        assert json.loads((tmp_path / "mlx_ckpt" / "config.json").read_text()) == cfg.to_dict()


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
    full = train_mlx(
        cfg, TrainConfig(max_iters=6, log_interval=1, **common), small_data, tmp_path / "a", **kw
    )
    train_mlx(cfg, TrainConfig(max_iters=3, log_interval=1, **common), small_data, tmp_path / "b", **kw)
    # the optimizer state saved at step 3 loads back exactly
    saved = mx.load(str(tmp_path / "b" / "last" / "state.safetensors"))
    opt = make_optimizer(load_mlx_model(tmp_path / "b"), TrainConfig(**common))
    load_optimizer_arrays(opt, saved)
    now = optimizer_arrays(opt)
    assert set(now) == set(saved) and int(now["mlx_optimizer.states.0.step"].item()) == 3
    assert all(np.array_equal(np.array(now[k]), np.array(saved[k])) for k in saved)
    resumed = train_mlx(
        cfg, TrainConfig(max_iters=6, log_interval=1, **common), small_data, tmp_path / "b", resume=True, **kw
    )
    assert resumed.steps == full.steps == 6
    losses = [[(r["step"], r.get("loss")) for r in read_log(tmp_path / run / "log.jsonl")] for run in "ab"]
    assert losses[0] == losses[1]  # bit-identical, dropout included
    assert resumed.best_val_loss == full.best_val_loss
    assert (tmp_path / "b" / "best" / "model.safetensors").is_file()
    load_model(tmp_path / "b")  # the torch side reads an MLX run


def test_rest_of_package_does_not_import_mlx():
    code = (
        "import sys, nanogpt.cli, nanogpt.train.loop, nanogpt.commands.train, nanogpt.infer.generate, nanogpt.train.checkpoint, nanogpt.infer.evaluate\n"
        "assert not any(m == 'mlx' or m.startswith('mlx.') for m in sys.modules), 'mlx imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_train_mlx_refuses_bad_input(tiny_cfg, small_data, tmp_path):
    from nanogpt.errors import UserError

    with pytest.raises(UserError, match="fp32"):
        train_mlx(tiny_cfg, TrainConfig(dtype="bf16"), small_data, tmp_path / "x", progress=False)
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "log.jsonl").write_text("")
    with pytest.raises(UserError, match="did not write.*--force"):  # the same folder rule as the torch trainer
        train_mlx(tiny_cfg, TrainConfig(), small_data, tmp_path / "y", progress=False)
    assert [p.name for p in (tmp_path / "y").iterdir()] == ["log.jsonl"]


def test_cli_backends_train_eval_sample_and_export(small_data, tmp_path, capsys):
    """`--backend mlx` through the real CLI: train, then eval/sample in both backends, then the card's
    transformers snippet on an export of the MLX-trained run."""
    from nanogpt.cli import main

    run = tmp_path / "mlx_run"
    cfg = tiny_config(context_length=32)
    cfg.save(tmp_path / "model.json")
    flags = [
        "--max-iters",
        "4",
        "--batch-size",
        "2",
        "--eval-interval",
        "2",
        "--eval-iters",
        "2",
        "--warmup-iters",
        "1",
    ]
    args = ["train", "--backend", "mlx", "--config", str(tmp_path / "model.json"), "--data", str(small_data)]
    assert main([*args, "--out", str(run), "--no-progress", *flags]) == 0
    capsys.readouterr()

    # the same checkpoint scored by both backends
    evals = {}
    for backend in ("torch", "mlx"):
        base = ["eval", "--model", str(run), "--data", str(small_data), "--max-tokens", "400", "--json"]
        assert main([*base, "--backend", backend]) == 0
        evals[backend] = json.loads(capsys.readouterr().out)
    assert evals["torch"]["tokens_scored"] == evals["mlx"]["tokens_scored"] == 399
    assert abs(evals["torch"]["mean_nll"] - evals["mlx"]["mean_nll"]) < 1e-4

    assert (
        main(
            ["sample", "--backend", "mlx", "--model", str(run), "--prompt", "Hello", "--max-new-tokens", "5"]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("Hello")

    # an MLX resume point is refused by the PyTorch trainer with the fix in the message
    assert main(["train", "--out", str(run), "--resume", "--max-iters", "6", "--no-progress"]) == 2
    assert "--backend mlx" in capsys.readouterr().err

    pytest.importorskip("transformers")
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "hf")]) == 0
    snippet = (
        "from transformers import AutoTokenizer, AutoModelForCausalLM\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / 'hf')!r}, trust_remote_code=True)\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}, trust_remote_code=True)\n"
        "inputs = tokenizer('Once upon a time', return_tensors='pt')\n"
        "outputs = model.generate(**inputs, max_length=12, temperature=0.8, top_k=50, do_sample=True,"
        " pad_token_id=tokenizer.eos_token_id)\n"
        "print(tokenizer.decode(outputs[0], skip_special_tokens=True))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", snippet],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("Once upon a time")
