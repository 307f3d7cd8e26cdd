"""`nanogpt demo` end to end on the builtin corpus: a 2-step smoke run by default, 25 steps under `-m slow`."""

import json
import math
from pathlib import Path

import pytest

from nanogpt.cli import main
from nanogpt.commands.demo import WIDGET_PROMPTS, demo_train_config


def test_demo_train_config_fits_the_budget():
    cfg = demo_train_config(s_per_iter=1.0, minutes=8, seed=0)
    assert 300 <= cfg.max_iters <= 480 and cfg.max_time == 480
    assert cfg.warmup_iters < cfg.max_iters and cfg.eval_interval <= cfg.max_iters // 5


@pytest.mark.slow
def test_demo_smoke(tmp_path, capsys, monkeypatch):
    """Every stage of the real command at its smallest: prepare, 2 steps, perplexity, samples, export, reload."""
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--iters", "2", "--minutes", "10", "--eval-tokens", "300"]
    assert main([*argv, "--out", "runs/demo", "--data", "data/builtin"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    run = tmp_path / "runs/demo"
    result = json.loads((run / "demo.json").read_text())
    assert result["steps"] == 2 and result["tokens"] == 2 * 8 * 128  # batch 8 of the tiny preset's 128
    assert result["val_tokens_scored"] == 299  # the first token of the 300 has no context
    for ppl in (result["init_val_ppl"], result["final_val_ppl"]):
        assert math.isfinite(ppl) and 1 < ppl < 2 * 50257  # about the vocabulary size untrained
    assert set(result["samples"]) == set(WIDGET_PROMPTS)
    assert all(result["samples"][p].startswith(p) for p in WIDGET_PROMPTS)
    assert (run / "loss.png").stat().st_size > 0 and (run / "best" / "config.json").is_file()
    assert (tmp_path / "data/builtin" / "meta.json").is_file()
    assert (run / "hf/modeling_nanogpt.py").is_file()
    assert result["hf_sample"].startswith(WIDGET_PROMPTS[0])  # loaded back through transformers
    assert "val perplexity" in out and all(f"--- {p}" in out for p in WIDGET_PROMPTS)
    assert f"exported to {Path('runs/demo/hf')}" in out  # where the Hugging Face folder went
    # the last line opens the model just trained in the playground: that command, on that run folder
    last = captured.err.strip().splitlines()[-1]
    assert f"nanogpt serve --model {Path('runs/demo')}" in last and "http://127.0.0.1:8000/" in last
    # a run the time cap cuts short says so at the end, with what to do about it
    capped = ["demo", "--iters", "400", "--minutes", "0.05", "--eval-tokens", "300", "--no-export"]
    assert main([*capped, "--out", "runs/capped", "--data", "data/builtin"]) == 0
    err = capsys.readouterr().err.splitlines()
    note = next(line for line in err if line.startswith("note: "))
    assert "stopped training at step" in note and "of 400 planned" in note and "--minutes" in note
    # a folder the demo did not write is refused before any work
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main([*argv, "--out", "other", "--no-export"]) == 2
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    # a fixed number of iterations (the time budget, 10 min, only caps it): the result does not depend on load
    assert (
        main(
            [
                "demo",
                "--iters",
                "25",
                "--minutes",
                "10",
                "--eval-tokens",
                "4000",
                "--out",
                "runs/demo",
                "--data",
                "data/builtin",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "runs/demo/demo.json").read_text())
    assert result["steps"] == 25
    assert result["final_val_ppl"] < result["init_val_ppl"] / 10  # ~50,000 at init; it must learn
    assert set(result["samples"]) == set(WIDGET_PROMPTS)
    assert all(result["samples"][p].startswith(p) for p in WIDGET_PROMPTS)
    assert (tmp_path / "runs/demo/loss.png").stat().st_size > 0
    assert (tmp_path / "runs/demo/hf/modeling_nanogpt.py").is_file()
    assert result["hf_sample"].startswith(WIDGET_PROMPTS[0])  # loaded back through transformers
    assert "val perplexity" in out
    # a second run replaces its own run folder rather than refusing
    assert main(["demo", "--iters", "2", "--eval-tokens", "200", "--out", "runs/demo", "--no-export"]) == 0
    capsys.readouterr()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["demo", "--iters", "2", "--eval-tokens", "200", "--out", "other", "--no-export"]) == 2
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
