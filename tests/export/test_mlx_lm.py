"""mlx-lm (Apple's MLX LLM runner; on Linux with `mlx[cpu]`) loads the `gpt2` export and computes our model.

mlx-lm's GPT-2 takes the reference checkpoint's tensor names (`h.0.attn.c_attn.weight`, `wte.weight`), always
runs the tanh GELU and always ties the head to `wte`. A tiny model, trained a few steps on real text, is
exported as gpt2 and run through `mlx_lm.load`, `mlx_lm.generate` and `mlx_lm.stream_generate` (greedy); the
tokens and every step's log-probabilities are compared with our own decode.

Tolerances: with `activation="gelu_tanh"` both sides compute the same function, so the only difference is
float32 arithmetic (mlx-lm's log-softmax is float32, ours float64; seen: 1.3e-5; bound 1e-4). With the exact
erf GELU (our default), mlx-lm's tanh GELU differs by at most 4.7e-4 per activation; on this 2-layer model
the log-probabilities moved by 1.8e-5 (seen), and a bigger model moves them more, so the bound is 1e-2: far
below what a wrong, transposed or swapped tensor does (changes of order 1), and the greedy tokens must still
be equal.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing below may touch the network

from nanogpt.commands.train import main as train_main  # noqa: E402
from nanogpt.data.tokenizer import get_tokenizer  # noqa: E402
from nanogpt.export import hf  # noqa: E402
from nanogpt.infer.generate import generate  # noqa: E402
from nanogpt.infer.sampling import SamplingParams  # noqa: E402
from nanogpt.train.checkpoint import load_model  # noqa: E402
from tests.tiny import TINY_MODEL  # noqa: E402

pytestmark = pytest.mark.ecosystem
PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak."
NEW_TOKENS = 12
BOUND = {"gelu_tanh": 1e-4, "gelu": 1e-2}  # max |log-probability difference|, see the module docstring


@pytest.fixture(scope="module")
def trained(small_data, tmp_path_factory):
    """The tiny model (d_ff = 4 x d_model, as mlx-lm's GPT-2 assumes) after 30 AdamW steps on real text."""
    root = tmp_path_factory.mktemp("mlx_lm")
    (root / "model.json").write_text(json.dumps(TINY_MODEL))
    argv = ["--data", str(small_data), "--out", str(root / "run"), "--config", str(root / "model.json")]
    quick = ["--max-iters", "30", "--batch-size", "4", "--eval-iters", "1", "--eval-interval", "30"]
    quick += ["--warmup-iters", "3", "--learning-rate", "1e-2", "--device", "cpu", "--threads", "1"]
    assert train_main([*argv, *quick, "--no-progress"]) == 0
    return root / "run"


def with_activation(run, activation: str, dst):
    """The run's best checkpoint, its config set to `activation` (the same weights, a valid model)."""
    shutil.copytree(run / "best", dst)
    conf = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**conf, "activation": activation}))
    return dst


def our_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) log-probabilities of the next token after each prefix of `ids`."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)


@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_mlx_lm_runs_the_gpt2_export_like_nanogpt(trained, tmp_path, activation):
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    ckpt = with_activation(trained, activation, tmp_path / "ckpt")
    res = hf.export(ckpt, tmp_path / "gpt2", "gpt2")
    assert res.notes == ()  # nothing mlx-lm cannot read
    model, tokenizer = mlx_lm.load(str(res.out))  # used to fail: "Received 52 parameters not in model"

    ours, tok = load_model(ckpt), get_tokenizer()
    ids = tok.encode(PROMPT)
    greedy = list(
        generate(ours, ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0), stop_at_eot=False)
    )
    steps = list(
        mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=NEW_TOKENS, sampler=make_sampler(temp=0.0))
    )
    assert [s.token for s in steps] == greedy
    text = mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=NEW_TOKENS, sampler=make_sampler(temp=0.0))
    assert text == tok.decode(greedy)

    # every generation step's log-probabilities (mlx-lm's KV cache) against our full forward pass
    want = our_logprobs(ours, ids + greedy)[len(ids) - 1 : -1]
    got = torch.tensor([s.logprobs.astype(mx.float32).tolist() for s in steps], dtype=torch.float64)
    step_diff = (got - want).abs().max().item()
    # and the prompt itself, all positions at once (mlx-lm's forward without a cache)
    logits = model(mx.array([ids]))[0].astype(mx.float32)
    prompt = torch.log_softmax(torch.tensor(logits.tolist(), dtype=torch.float64), -1)
    prompt_diff = (prompt - our_logprobs(ours, ids)).abs().max().item()
    print(f"mlx-lm, {activation}: max |log-prob diff| {step_diff:.2g} (steps), {prompt_diff:.2g} (prompt)")
    assert step_diff < BOUND[activation] and prompt_diff < BOUND[activation]


def test_mlx_lm_cannot_load_a_gpt2_export_whose_d_ff_is_not_4x(trained, tmp_path):
    """What the export's note says: transformers reads n_inner, mlx-lm's GPT-2 builds 4 x n_embd."""
    import mlx_lm

    from nanogpt.model.gpt import NanoGPTLMHeadModel
    from nanogpt.train.checkpoint import save_model
    from tests.tiny import tiny_config

    torch.manual_seed(0)
    save_model(tmp_path / "ckpt", NanoGPTLMHeadModel(tiny_config(d_ff=96)))
    res = hf.export(tmp_path / "ckpt", tmp_path / "gpt2", "gpt2")
    assert len(res.notes) == 1 and "mlx-lm cannot load this gpt2 export" in res.notes[0]
    assert "d_ff 96" in res.notes[0] and "(128)" in res.notes[0]
    with pytest.raises(ValueError, match="shape"):
        mlx_lm.load(str(res.out))
