"""`nanogpt recipe`: the whole pipeline from one file; a kill in the middle of distillation and the same command
again give the weights of an uninterrupted run; finished stages are skipped; failures name the stage."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from nanogpt.cli import main
from tests.bad_input import refuse, run_nanogpt
from tests.processes import kill_when

QUICK = {"batch_size": 2, "eval_iters": 1, "warmup_iters": 1, "learning_rate": 1e-3}
RECIPE = {
    "prepare": {"source": "builtin", "max_tokens": 120_000},
    "base": {"preset": "tiny", "max_iters": 6, "eval_interval": 3, **QUICK},
    "teacher": {"preset": "tiny", "max_iters": 12, "eval_interval": 6, **QUICK},
    "distill": {"alpha": 0.5, "temperature": 2.0, "max_iters": 40, "eval_interval": 4, **QUICK},
    "eval": {"max_tokens": 2000},
    "export": {"formats": ["remote-code", "gguf"]},
}


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "recipe.json"
    path.write_text(json.dumps(RECIPE))
    return path


def recipe_argv(recipe: Path, work: Path) -> list[str]:
    return ["recipe", str(recipe), "--out", str(work), "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def uninterrupted(recipe_file, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("whole") / "work"
    r = run_nanogpt(recipe_argv(recipe_file, work), timeout=900)
    assert r.returncode == 0, r.stderr
    return work


@pytest.mark.slow
def test_every_stage_runs_and_is_recorded(uninterrupted):
    state = json.loads((uninterrupted / "recipe.json").read_text())
    assert state["done"] == ["prepare", "base", "teacher", "distill", "eval", "export"]
    assert json.loads((uninterrupted / "distill" / "last" / "state.json").read_text())["step"] == 40
    held_out = json.loads((uninterrupted / "eval.json").read_text())
    assert held_out["perplexity"] > 1 and held_out["tokens_scored"] > 0
    assert (uninterrupted / "export" / "remote-code" / "modeling_nanogpt.py").is_file()
    assert (uninterrupted / "export" / "model.gguf").stat().st_size > 0


@pytest.mark.slow
def test_the_exported_card_tells_the_lineage(uninterrupted):
    """Both stages with their data, iterations and losses; the teacher, its method, alpha and T; the
    iterations added up (the card's "checkpoint 35000"); the held-out perplexity of `nanogpt eval`."""
    card = (uninterrupted / "export" / "remote-code" / "README.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith(("| train |", "| distill |"))]
    assert [r.split(" | ")[0] for r in rows] == ["| train", "| distill"]
    assert " | 6 | " in rows[0] and " | 40 | " in rows[1]  # each stage's own iterations
    teacher = next(line for line in card.splitlines() if "Teacher of the distill stage" in line)
    assert str(uninterrupted / "teacher") in teacher and "forward_kl" in teacher
    assert "α = 0.5" in teacher and "T = 2.0" in teacher
    assert "Total iterations across stages:** 46" in card
    held_out = json.loads((uninterrupted / "eval.json").read_text())
    assert f"Held-out perplexity (`nanogpt eval`):** {held_out['perplexity']:.2f}" in card
    assert f"{held_out['bits_per_byte']:.4f} bits per byte" in card


@pytest.mark.slow
def test_a_rerun_skips_finished_stages(recipe_file, uninterrupted, capsys):
    before = (uninterrupted / "distill" / "last" / "model.safetensors").stat().st_mtime_ns
    assert main(recipe_argv(recipe_file, uninterrupted)) == 0
    out = capsys.readouterr().out
    assert out.count("(done, skipped)") == 6
    assert (uninterrupted / "distill" / "last" / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_killed_in_distillation_the_same_command_continues_exactly(recipe_file, uninterrupted, tmp_path):
    work = tmp_path / "work"
    argv = [sys.executable, "-m", "nanogpt", *recipe_argv(recipe_file, work)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    state = work / "distill" / "last" / "state.json"

    def mid_distillation() -> bool:
        try:
            return 8 <= json.loads(state.read_text())["step"] < 40
        except (OSError, ValueError, KeyError):
            return False

    try:
        kill_when(mid_distillation, proc, timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert "distill" not in json.loads((work / "recipe.json").read_text())["done"]
    r = run_nanogpt(recipe_argv(recipe_file, work), timeout=900)  # the same command again
    assert r.returncode == 0, r.stderr
    assert "continuing from its checkpoint" in r.stdout and r.stdout.count("(done, skipped)") == 3
    for name in ("last", "best"):
        got = load_file(str(work / "distill" / name / "model.safetensors"))
        want = load_file(str(uninterrupted / "distill" / name / "model.safetensors"))
        assert got.keys() == want.keys()
        assert all((got[k] == want[k]).all() for k in got), f"{name}/ differs from the uninterrupted run"


def test_a_failed_stage_names_itself_and_the_command_to_continue(capsys, tmp_path):
    recipe = {**RECIPE, "distill": {**RECIPE["distill"], "teacher": str(tmp_path / "no_teacher")}}
    recipe.pop("teacher")
    recipe["prepare"] = {"source": "builtin", "max_tokens": 60_000}
    recipe["base"] = {**RECIPE["base"], "max_iters": 2}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    work = tmp_path / "w"
    line = refuse(capsys, recipe_argv(path, work), names=["stage distill failed", "not found"], fix="continue with")
    assert f"nanogpt recipe {path} --out {work} --threads 1 --no-progress" in line
    assert json.loads((work / "recipe.json").read_text())["done"] == ["prepare", "base"]


@pytest.mark.parametrize(
    "text, names",
    [
        ('{"prepare": {}, "base": {}, "finetune": {}}', "unknown stage 'finetune'"),
        ('{"prepare": {}}', "no 'base' stage"),
        ('{"prepare": {}, "base": 3}', "must be an object"),
        ("[1]", "JSON object"),
        ("{", "not valid JSON"),
    ],
)
def test_bad_recipes(capsys, tmp_path, text, names):
    path = tmp_path / "r.json"
    path.write_text(text)
    refuse(capsys, recipe_argv(path, tmp_path / "w"), names=names, fix="recipe", untouched=[path])
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_another_recipes_work_folder_is_refused(capsys, recipe_file, uninterrupted, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**RECIPE, "eval": {"max_tokens": 1000}}))
    refuse(
        capsys,
        recipe_argv(other, uninterrupted),
        names="another recipe",
        fix="--force",
        untouched=[uninterrupted / "recipe.json"],
    )


def test_the_shipped_recipes_plan(capsys):
    for name in ("recipe_builtin.json", "recipe_card.json"):
        path = Path(__file__).parents[2] / "configs" / name
        assert main(["recipe", str(path), "--out", "/nonexistent/work", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--teacher chat:openai/gpt-oss-20b@https://api.groq.com/openai/v1" in out
    assert "--api-key-env GROQ_API_KEY" in out and "--preset card" in out


@pytest.mark.slow
def test_the_recipe_in_mlx(recipe_file, tmp_path):
    """--backend mlx: every training stage and eval in MLX; the export (PyTorch) reads it; the card tells it."""
    pytest.importorskip("mlx.core")
    recipe = {**RECIPE, "teacher": {**RECIPE["teacher"], "max_iters": 6}}
    recipe["distill"] = {**RECIPE["distill"], "max_iters": 8}
    recipe["prepare"] = {"source": "builtin", "max_tokens": 60_000}
    path = tmp_path / "mlx.json"
    path.write_text(json.dumps(recipe))
    work = tmp_path / "work"
    r = run_nanogpt([*recipe_argv(path, work), "--backend", "mlx"], timeout=900)
    assert r.returncode == 0, r.stderr
    assert "train --data" in r.stdout and r.stdout.count("--backend mlx") >= 4  # base, teacher, distill, eval
    for stage in ("base", "teacher", "distill"):
        assert json.loads((work / stage / "last" / "state.json").read_text())["backend"] == "mlx", stage
    state = json.loads((work / "recipe.json").read_text())
    assert state["done"] == ["prepare", "base", "teacher", "distill", "eval", "export"]
    card = (work / "export" / "remote-code" / "README.md").read_text()
    assert "Total iterations across stages:** 14" in card  # 6 base + 8 distilled
