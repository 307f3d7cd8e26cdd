"""`nanogpt eval`'s per-document scores against lm-evaluation-harness itself, on an exported tiny model, offline.

lm-eval's `hf` model loads the `nanogpt export` folder; its `loglikelihood_rolling` must equal our per-document
log-likelihoods (1e-4 nats per document), and the recipe in docs/evaluation.md, run as written, must print
the bits per byte `nanogpt eval` prints.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.export.hf import export
from nanogpt.infer.evaluate import document_nlls
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import save_model
from tests.corpus import real_texts
from tests.tiny import tiny_config

pytestmark = pytest.mark.ecosystem
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
DOCS = Path(__file__).parents[2] / "docs" / "evaluation.md"
CONTEXT = 32


def texts() -> list[str]:
    """Documents of 1 to 6 windows at a 32-token context, one with characters beyond ASCII."""
    cut = [t[:n] for t, n in zip(real_texts(5), [12, 116, 131, 300, 700], strict=True)]
    return [
        *cut,
        "Café naïve — 東京 🚀, and then some more words to cross one window of thirty-two tokens, and a few more.",
    ]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, NanoGPTLMHeadModel]:
    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(tiny_config(context_length=CONTEXT)).eval()
    return save_model(tmp_path_factory.mktemp("run") / "ckpt", model), model


@pytest.mark.parametrize("fmt", ["gpt2", "remote-code"])
def test_document_log_likelihoods_equal_lm_evals_loglikelihood_rolling(tiny_run, tmp_path, monkeypatch, fmt):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    ckpt, model = tiny_run
    folder = export(ckpt, tmp_path / fmt, fmt).out
    lm = HFLM(pretrained=str(folder), device="cpu", batch_size=4, dtype="float32", trust_remote_code=True)
    assert lm.max_length == CONTEXT and lm.prefix_token_id == 50256  # its windows and prefix are ours
    docs = texts()
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(docs)]
    theirs = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    tokens = [get_tokenizer().encode(t) for t in docs]
    assert [len(t) for t in tokens] == [
        6,
        33,
        32,
        88,
        166,
        34,
    ]  # in one window, exactly one, one past it, many
    ours = document_nlls(model, tokens, batch_size=3)
    gaps = [abs(ll + nll) for ll, nll in zip(theirs, ours, strict=True)]
    print(f"{fmt}: largest |lm-eval - ours| {max(gaps):.2e} nats over {len(docs)} documents")
    assert max(gaps) < 1e-4, list(zip(theirs, ours, strict=True))


def doc_block(lang: str, containing: str) -> str:
    """The one ```lang code block of docs/evaluation.md that contains `containing`."""
    blocks = [b for b in re.findall(rf"```{lang}\n(.*?)```", DOCS.read_text(), re.S) if containing in b]
    assert len(blocks) == 1, f"docs/evaluation.md: expected one {lang} block with {containing!r}"
    return blocks[0]


def recipe_commands() -> list[list[str]]:
    """The recipe's shell commands as argv lists (continuations joined, comments dropped)."""
    text = doc_block("bash", "lm_eval --model hf").replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()]


def test_the_documented_lm_eval_recipe_gives_nanogpts_bits_per_byte(tiny_run, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    ckpt, _ = tiny_run
    work = tmp_path / "work"  # laid out as the recipe expects: runs/demo, docs.jsonl, tasks/mytext.yaml
    (work / "runs").mkdir(parents=True)
    (work / "runs" / "demo").symlink_to(ckpt)
    (work / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts()))
    (work / "tasks").mkdir()
    (work / "tasks" / "mytext.yaml").write_text(doc_block("yaml", "loglikelihood_rolling"))

    outputs = {}
    for argv in recipe_commands():
        env = {**os.environ, **OFFLINE}  # whatever the recipe says, this test never reaches the Hub
        while re.fullmatch(r"[A-Z_]+=.*", argv[0]):  # the recipe's VAR=value prefixes
            key, _, value = argv.pop(0).partition("=")
            env[key] = value
        name = argv[1] if argv[0] == "nanogpt" else argv[0]  # export, lm_eval, eval
        if name == "lm_eval":
            assert {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"} <= set(os.environ) | set(env)
        extra = ["--json"] if name == "eval" else []  # the recipe's eval, read by a program
        cmd = [sys.executable, "-m", argv[0], *argv[1:], *extra]
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        outputs[name] = r.stdout
    assert sorted(outputs) == ["eval", "export", "lm_eval"]

    (results_file,) = (work / "results").rglob("results_*.json")
    theirs = json.loads(results_file.read_text())["results"]["mytext"]
    ours = json.loads(outputs["eval"])
    assert ours["mode"] == "documents" and ours["documents"] == len(texts())
    assert ours["n_bytes"] == sum(len(t.encode("utf-8")) for t in texts())
    assert ours["bits_per_byte"] == pytest.approx(theirs["bits_per_byte,none"], rel=1e-6)
    assert 2 ** ours["bits_per_byte"] == pytest.approx(theirs["byte_perplexity,none"], rel=1e-6)
    assert "bits_per_byte" in outputs["lm_eval"]  # its printed table

    # the stream reading (`--stream`) is what lm-eval does not do: a few percent off on short documents
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanogpt",
            "eval",
            "--model",
            "runs/demo",
            "--text",
            "docs.jsonl",
            "--stream",
            "--json",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    stream = json.loads(r.stdout)["bits_per_byte"]
    assert abs(stream / ours["bits_per_byte"] - 1) > 0.01
    print(
        f"bits per byte: lm-eval {theirs['bits_per_byte,none']:.6f}, per document {ours['bits_per_byte']:.6f}, "
        f"stream {stream:.6f} ({100 * (stream / ours['bits_per_byte'] - 1):+.1f}%)"
    )
    assert math.isfinite(stream)
