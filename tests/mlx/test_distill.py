"""`distill --backend mlx` against PyTorch: every teacher kind's loss on the same weights and batch (1e-5),
20 distillation steps (the training parity tolerance), the chunked MLX loss against full logits, exact
resume after a kill, and an MLX-distilled run read by the PyTorch commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core", reason="MLX is not installable here (pip install 'mlx[cpu]' on Linux)")

import nanogpt.mlx.losses as mlx_losses  # noqa: E402
from nanogpt.commands.distill import main as distill_main  # noqa: E402
from nanogpt.config import TrainConfig  # noqa: E402
from nanogpt.data.shards import BatchSampler, TokenData  # noqa: E402
from nanogpt.distill.api import AnswerCache, ApiClient, TopKDistillLoss  # noqa: E402
from nanogpt.distill.chunked import Mix  # noqa: E402
from nanogpt.distill.local import DistillLossFn, load_local_teacher  # noqa: E402
from nanogpt.distill.mlx_teachers import DenseMlxLoss, dense_teacher, for_mlx  # noqa: E402
from nanogpt.distill.sequence import MixedDataLoss  # noqa: E402
from nanogpt.distill.teachers import TeacherSettings, TeacherSpec, api_config  # noqa: E402
from nanogpt.mlx.train.optim import make_optimizer, make_parts_step, to_mx  # noqa: E402
from nanogpt.model.gpt import NanoGPTLMHeadModel as TorchGPT  # noqa: E402
from nanogpt.train import checkpoint as torch_checkpoint  # noqa: E402
from nanogpt.train.losses import LossLog  # noqa: E402
from nanogpt.train.optim import backward_micro_batches, lr_at, optimizer_step  # noqa: E402
from nanogpt.train.optim import make_optimizer as torch_optimizer  # noqa: E402
from nanogpt.train.plot import read_log  # noqa: E402
from tests.local_server import Server  # noqa: E402
from tests.mlx import torch_and_mlx  # noqa: E402
from tests.processes import kill_when  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402

CTX = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A teacher and a student checkpoint (random weights, dropout 0) and the student in both backends."""
    root = tmp_path_factory.mktemp("mlx_distill")
    cfg = tiny_config(context_length=CTX)
    torch.manual_seed(1)
    torch_checkpoint.save_model(root / "teacher", TorchGPT(cfg))
    tm, mm = torch_and_mlx(cfg, root, seed=5)
    torch_checkpoint.save_model(root / "student", tm)
    return root, tm, mm


@pytest.fixture(scope="module")
def batch(small_data):
    sampler = BatchSampler(TokenData(small_data).split("train"), 3, CTX, seed=2)
    return sampler.next()


def mlx_parts(loss, model, x, y):
    """What the MLX trainer computes for one micro-batch: the teacher's inputs, then the loss on them."""
    inputs = loss.inputs(x, y)
    xs, ys = to_mx([(x, y)])
    return [float(v.item()) for v in loss.parts(model, xs[0], ys[0], inputs, loss.constants)]


def torch_parts(loss, model, x, y):
    with torch.no_grad():
        total = float(loss(model, x, y))
    rec = loss.log.history[-1]
    return [total, rec["hard"], rec["soft"]]


# --- each teacher kind: the MLX loss equals the PyTorch loss on the same weights and batch ------------------


@pytest.mark.parametrize(
    "div,T,beta", [("forward_kl", 1.0, 0.5), ("reverse_kl", 2.0, 0.5), ("jsd", 2.0, 0.3)]
)
def test_dense_local_teacher_loss_matches_torch(models, batch, div, T, beta):
    root, tm, mm = models
    x, y = batch
    torch_loss = DistillLossFn(load_local_teacher(root / "teacher"), 0.3, T, div, beta)
    hidden, head = dense_teacher(str(root / "teacher"), "fp32", "cpu")
    mlx_loss = DenseMlxLoss(hidden, head, Mix(0.3, T, div, beta), tm.config, LossLog())
    ours, theirs = mlx_parts(mlx_loss, mm, x, y), torch_parts(torch_loss, tm, x, y)
    assert theirs[2] > 1e-3  # a real soft loss: the two models disagree
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_dense_hf_teacher_runs_in_torch_and_matches(models, batch, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, tm, mm = models
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=50257)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path / "hf")
    x, y = batch
    torch_loss = DistillLossFn(load_local_teacher(tmp_path / "hf"), 0.5, 1.5)
    hidden, head = dense_teacher(str(tmp_path / "hf"), "fp32", "cpu")
    mlx_loss = DenseMlxLoss(hidden, head, Mix(0.5, 1.5), tm.config, LossLog())
    np.testing.assert_allclose(mlx_parts(mlx_loss, mm, x, y), torch_parts(torch_loss, tm, x, y), atol=1e-5)


def test_chunked_mlx_loss_equals_full_logits_with_ignored_positions(monkeypatch):
    """Values and gradients of the chunked MLX loss (several chunks, the last short) against full logits."""
    from nanogpt.distill.chunked import chunked_distill_parts

    g = torch.Generator().manual_seed(0)
    n, d, dt, V = 37, 16, 24, 101
    h, w = torch.randn(n, d, generator=g), torch.randn(V, d, generator=g) * 0.5
    t_h, t_w = torch.randn(n, dt, generator=g), torch.randn(V, dt, generator=g) * 0.5
    y = torch.randint(0, V, (n,), generator=g)
    y[[3, 10, 30]] = mlx_losses.IGNORE
    monkeypatch.setattr(mlx_losses, "CHUNK_ELEMENTS", V * 5)
    for div in ("forward_kl", "reverse_kl", "jsd"):
        hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
        ref = chunked_distill_parts((hr, wr), (t_h, t_w), y, Mix(0.3, 2.5, div, 0.4))
        ref.total.backward()

        def total(hm, wm, div=div):
            teacher = (mx.array(t_h.numpy()), mx.array(t_w.numpy()))
            return mlx_losses.chunked_parts((hm, wm), teacher, mx.array(y.numpy()), 0.3, 2.5, div, 0.4)[0]

        value, (gh, gw) = mx.value_and_grad(total, argnums=(0, 1))(mx.array(h.numpy()), mx.array(w.numpy()))
        assert abs(value.item() - ref.total.item()) < 1e-5
        np.testing.assert_allclose(np.array(gh), hr.grad.numpy(), atol=1e-5)
        np.testing.assert_allclose(np.array(gw), wr.grad.numpy(), atol=1e-5)
        assert np.abs(np.array(gh)[[3, 10, 30]]).max() == 0  # ignored positions get no gradient


def test_topk_api_teacher_loss_matches_torch(models, batch, tmp_path):
    root, tm, mm = models
    srv = Server(root / "teacher", tmp_path / "serve.log")
    try:
        spec = TeacherSpec("completions", model="tiny", base_url=f"{srv.url}/v1")
        client = ApiClient(api_config(spec, TeacherSettings()), AnswerCache(tmp_path / "cache.sqlite"))
        torch_loss = TopKDistillLoss(client, k=5, alpha=0.4, T=2.0)
        x, y = batch
        theirs = torch_parts(torch_loss, tm, x, y)
        ours = mlx_parts(for_mlx(torch_loss, tm.config), mm, x, y)  # the same answers, from the cache
    finally:
        srv.stop()
    assert srv.requests() == 3 and theirs[2] > 1e-3
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_sequence_level_loss_matches_torch(models, batch, small_data):
    """The mixed batch (data + a teacher's text; here a real data folder stands for the text)."""
    _, tm, mm = models
    torch_loss = MixedDataLoss(small_data, CTX, alpha=0.3)
    x, y = batch
    theirs = torch_parts(torch_loss, tm, x, y)
    ours = mlx_parts(for_mlx(torch_loss, tm.config), mm, x, y)
    assert theirs[1] != theirs[2]  # two different batches
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_uld_loss_matches_torch(models, batch, tmp_path):
    pytest.importorskip("transformers")
    from nanogpt.distill.crossvocab import load_text_teacher
    from nanogpt.distill.uld import UldLossFn
    from tests.distill.other_vocab import save_other_vocab_teacher

    _, tm, mm = models
    torch_loss = UldLossFn(load_text_teacher(save_other_vocab_teacher(tmp_path / "llama")), 0.4, 1.5)
    x, y = batch
    theirs = torch_parts(torch_loss, tm, x, y)
    ours = mlx_parts(for_mlx(torch_loss, tm.config), mm, x, y)
    assert torch_loss.log.history[-1]["aligned"] > 0.5 and theirs[2] > 1e-3
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


# --- training: 20 steps in each backend -----------------------------------------------------------------


def test_twenty_distillation_steps_match_torch(models, small_data, tmp_path):
    root, _, _ = models
    cfg = tiny_config(context_length=CTX)
    tc = TrainConfig(
        batch_size=2, grad_accum_steps=2, learning_rate=5e-3, min_lr=5e-4, warmup_iters=5, max_iters=20
    )
    tm, mm = torch_and_mlx(cfg, tmp_path, seed=7)
    sampler = BatchSampler(TokenData(small_data).split("train"), tc.batch_size, CTX, seed=3)
    steps = [[sampler.next() for _ in range(tc.grad_accum_steps)] for _ in range(tc.max_iters)]
    torch_loss = DistillLossFn(load_local_teacher(root / "teacher"), 0.5, 2.0)
    tm.train()
    t_opt = torch_optimizer(tm, tc, torch.device("cpu"))
    theirs = []
    for i, batches in enumerate(steps):
        theirs.append(float(backward_micro_batches(tm, batches, torch_loss, torch.device("cpu"))))
        optimizer_step(tm, t_opt, lr_at(i + 1, tc), tc.grad_clip)
    hidden, head = dense_teacher(str(root / "teacher"), "fp32", "cpu")
    mlx_loss = DenseMlxLoss(hidden, head, Mix(0.5, 2.0), cfg, LossLog())
    mm.train()
    m_opt = make_optimizer(mm, tc)
    step = make_parts_step(mm, m_opt, tc, mlx_loss.parts)
    ours = []
    for i, batches in enumerate(steps):
        m_opt.learning_rate = lr_at(i + 1, tc)
        inputs = tuple(
            mx.stack(list(a)) for a in zip(*(mlx_loss.inputs(x, y) for x, y in batches), strict=True)
        )
        loss, _, halves = step(*to_mx(batches), inputs, mlx_loss.constants)
        ours.append(loss.item())
        assert halves.shape == (2, 2)
    diff = np.abs(np.array(theirs) - np.array(ours))
    print(f"max |loss diff| over {tc.max_iters} distillation steps: {diff.max():.2e}")
    assert theirs[-1] < theirs[0] - 0.3  # it really trains
    assert diff.max() < 1e-3, diff  # tests/mlx/test_train.py's tolerance for 20 training steps


# --- the command: resume after a kill, every kind, the PyTorch side reads the run ------------------------------


def kd_argv(root: Path, data: Path, out: Path, *extra: str, student: Path | None = None) -> list[str]:
    return [
        "--backend", "mlx", "--student", str(student or root / "student"), "--teacher", str(root / "teacher"),
        "--data", str(data), "--out", str(out), "--batch-size", "2", "--eval-iters", "1",
        "--eval-interval", "2", "--log-interval", "1", "--learning-rate", "1e-3", "--no-progress", *extra,
    ]  # fmt: skip


def test_killed_mlx_distillation_resumes_exactly(models, small_data, tmp_path):
    root, _, _ = models
    student = torch_checkpoint.save_model(
        tmp_path / "s", TorchGPT(tiny_config(context_length=CTX, dropout=0.1))
    )
    assert (
        distill_main(kd_argv(root, small_data, tmp_path / "full", "--max-iters", "8", student=student)) == 0
    )
    run = tmp_path / "cut"
    argv = [
        sys.executable,
        "-m",
        "nanogpt",
        "distill",
        *kd_argv(root, small_data, run, "--max-iters", "8", student=student),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = run / "last" / "state.json"

    def mid_run() -> bool:
        try:
            return 2 <= json.loads(state.read_text())["step"] < 8
        except (OSError, ValueError, KeyError):
            return False

    kill_when(mid_run, proc, timeout=300)
    assert distill_main(["--backend", "mlx", "--out", str(run), "--resume", "--no-progress"]) == 0
    logs = [
        [(r["step"], r.get("loss"), r.get("train_ce")) for r in read_log(p / "log.jsonl")]
        for p in (tmp_path / "full", run)
    ]
    assert logs[0] == logs[1] and len(logs[0]) == 9  # bit-identical, dropout included
    halves = [(tmp_path / f"{n}.teacher" / "distill_log.jsonl").read_text() for n in ("full", "cut")]
    assert halves[0] == halves[1]  # the log of the halves is trimmed to the checkpoint and written again
    weights = [mx.load(str(p / "last" / "model.safetensors")) for p in (tmp_path / "full", run)]
    assert all(np.array_equal(np.array(weights[0][k]), np.array(weights[1][k])) for k in weights[0])
    # the PyTorch side reads the MLX-distilled run: its weights, and `eval` through the real command
    torch_checkpoint.load_model(run)
    from nanogpt.commands.eval import main as eval_main

    assert (
        eval_main(["--model", str(run), "--data", str(small_data), "--max-tokens", "200", "--no-progress"])
        == 0
    )
    assert json.loads((run / "lineage.json").read_text())["stage"]["teacher"]["method"] == "forward_kl"


@pytest.mark.slow
def test_every_teacher_kind_runs_through_the_command(models, small_data, tmp_path):
    pytest.importorskip("transformers")
    from tests.distill.other_vocab import save_other_vocab_teacher

    root, _, _ = models
    llama = save_other_vocab_teacher(tmp_path / "llama")
    seq = ["--prompts", "4", "--prompt-tokens", "8", "--reply-tokens", "8"]
    chat_teacher = torch_checkpoint.save_model(tmp_path / "chat_teacher", TorchGPT(tiny_config()))  # context 64
    srv = Server(chat_teacher, tmp_path / "serve.log")
    try:
        kinds = {
            "jsd": ["--kind", "jsd", "--temperature", "2"],
            "uld": ["--teacher", str(llama), "--kind", "uld"],
            "sequence": ["--teacher", str(llama), "--kind", "sequence", *seq],
            "completions": ["--teacher", f"completions:tiny@{srv.url}/v1", "--top-k", "4"],
            "chat": ["--teacher", f"chat:tiny@{srv.url}/v1", *seq],
        }
        for name, extra in kinds.items():
            out = tmp_path / name
            assert distill_main([*kd_argv(root, small_data, out, "--max-iters", "2"), *extra]) == 0, name
            halves = [
                json.loads(x)
                for x in (tmp_path / f"{name}.teacher" / "distill_log.jsonl").read_text().splitlines()
            ]
            assert [h["step"] for h in halves] == [1, 2] and all(h["soft"] > 0 for h in halves), name
            assert json.loads((out / "last" / "state.json").read_text())["backend"] == "mlx"
    finally:
        srv.stop()
