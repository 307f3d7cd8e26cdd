"""`--backend mlx` through the real commands: train, eval and sample in both backends, export, the refusals'
order; and the rest of the package never importing MLX."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("mlx.core", reason="MLX is not installable here (pip install 'mlx[cpu]' on Linux)")

from nanogpt.cli import main  # noqa: E402
from nanogpt.config import TrainConfig  # noqa: E402
from nanogpt.train.optim import schedule_warning  # noqa: E402
from tests.bad_input import refuse  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402


def test_rest_of_package_does_not_import_mlx():
    code = (
        "import sys, nanogpt.cli, nanogpt.train.loop, nanogpt.commands.train, nanogpt.infer.generate, nanogpt.train.checkpoint, nanogpt.infer.evaluate\n"
        "assert not any(m == 'mlx' or m.startswith('mlx.') for m in sys.modules), 'mlx imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bad_data_is_refused_before_the_schedule_warning(capsys, tmp_path):
    """As the torch trainer: the data folder is checked first, so a run that cannot start says only why."""
    flags = ["--max-iters", "3", "--warmup-iters", "3"]
    assert schedule_warning(TrainConfig(max_iters=3, warmup_iters=3)) is not None  # the warmup is bad too
    tiny_config().save(tmp_path / "model.json")
    out, data = tmp_path / "run", tmp_path / "no_data"
    argv = ["train", "--backend", "mlx", "--config", str(tmp_path / "model.json"), "--data", str(data)]
    refuse(
        capsys,
        [*argv, "--out", str(out), "--no-progress", *flags],
        names=["data folder", str(data), "not found"],
        fix="nanogpt prepare",
        untouched=[tmp_path / "model.json"],
    )
    assert not out.exists()  # the folder the run would have made is gone again


@pytest.mark.slow
def test_cli_backends_train_eval_sample_and_export(small_data, tmp_path, capsys):
    """`--backend mlx` through the real CLI: train, then eval/sample in both backends, then the card's
    transformers snippet on an export of the MLX-trained run."""
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

    # the same checkpoint scored by both backends, per document (the first token after the separator
    # too: 400) and as one stream (from the second token on: 399)
    for mode, scored in (([], 400), (["--stream"], 399)):
        evals = {}
        for backend in ("torch", "mlx"):
            base = ["eval", "--model", str(run), "--data", str(small_data), "--max-tokens", "400", "--json"]
            assert main([*base, *mode, "--backend", backend]) == 0
            evals[backend] = json.loads(capsys.readouterr().out)
        assert evals["torch"]["tokens_scored"] == evals["mlx"]["tokens_scored"] == scored
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


def test_eval_of_a_chat_folder_agrees_across_backends(tmp_path, capsys):
    """A chat folder's assistant-token loss: the same conversations and targets, NLL within 1e-5."""
    import torch

    from nanogpt.data.prepare import prepare
    from nanogpt.model.gpt import NanoGPTLMHeadModel
    from nanogpt.train.checkpoint import save_model
    from tests.data.test_chat import CHAT

    prepare(str(CHAT), tmp_path / "chat", val_fraction=0.2, verbose=False)
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "ckpt", NanoGPTLMHeadModel(tiny_config()))
    got = {}
    for backend in ("torch", "mlx"):
        argv = ["eval", "--model", str(ckpt), "--data", str(tmp_path / "chat"), "--json", "--no-progress"]
        assert main([*argv, "--backend", backend]) == 0
        got[backend] = json.loads(capsys.readouterr().out)
    assert got["mlx"]["mode"] == "conversations"
    assert got["torch"]["tokens_scored"] == got["mlx"]["tokens_scored"] > 0
    assert abs(got["torch"]["mean_nll"] - got["mlx"]["mean_nll"]) < 1e-5
