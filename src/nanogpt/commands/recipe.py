"""`nanogpt recipe FILE --out WORK`: the card's whole pipeline, stage by stage, from one recipe file.

prepare -> base training -> (a local teacher, when the recipe trains its own) -> distillation -> held-out
evaluation -> bench -> export (remote-code and GGUF). Each stage is the nanogpt command of the same name,
run with the recipe's flags for it, into its own folder under WORK. The plan is data (`plan`), worked out
from the recipe and from what WORK already holds, then applied stage by stage (`run`):

- a finished stage is recorded in WORK/recipe.json and skipped by a rerun;
- an interrupted training stage whose run holds a checkpoint continues with `--resume` (exact, with the same
  `--threads`); one killed before its first checkpoint starts again;
- a failed stage says which stage failed and the command that continues from it.

The recipe is JSON, with one object per stage whose keys are that command's flags (`"max_iters": 20000` is
`--max-iters 20000`, `true` a bare flag); `configs/recipe_builtin.json` runs offline in minutes,
`configs/recipe_card.json` is the card's own (FineWeb-Edu, a teacher behind an API). API keys come from the
environment variable the distill stage names (`api_key_env`), never from the file.

    nanogpt recipe configs/recipe_builtin.json --out runs/recipe --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanogpt.commands.options import add_backend, add_threads
from nanogpt.errors import ArgumentParser, UserError

STAGES = ("prepare", "base", "teacher", "distill", "eval", "bench", "export")
TRAINING = ("base", "teacher", "distill")  # stages that write a run folder and resume from it
STATE = "recipe.json"  # WORK/recipe.json: the recipe's hash and the stages finished
MLX_STAGES = ("base", "teacher", "distill", "eval")  # what runs in MLX with --backend mlx


@dataclass(frozen=True)
class Stage:
    """One step of the plan: the nanogpt command to run with its arguments, and whether it is done."""

    name: str
    command: str
    argvs: list[list[str]]  # one run of the command each (export: one per format)
    done: bool = False
    resume: bool = False  # a training stage continuing from its checkpoint


def flags(options: dict[str, Any]) -> list[str]:
    """{"max_iters": 20000, "compile": true} -> ["--max-iters", "20000", "--compile"] (false/None: left out)."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, str(value)]
    return argv


def read_recipe(path: Path) -> dict[str, dict[str, Any]]:
    """The recipe file: a JSON object of stage -> options, checked for unknown stages and the required ones."""
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(
            f"recipe {path} cannot be read ({e.strerror}); pass a recipe file such as configs/recipe_builtin.json"
        ) from None
    except ValueError as e:
        raise UserError(
            f"recipe {path} is not valid JSON ({e}); fix it or start from configs/recipe_builtin.json"
        ) from None
    if not isinstance(recipe, dict):
        raise UserError(f"recipe {path} must hold a JSON object of stages; see configs/recipe_builtin.json")
    recipe = {k: v for k, v in recipe.items() if not k.startswith("_")}  # "_comment" keys are notes
    unknown = [k for k in recipe if k not in STAGES]
    if unknown:
        raise UserError(f"recipe {path}: unknown stage {unknown[0]!r}; the stages are {', '.join(STAGES)}")
    bad = [k for k, v in recipe.items() if not isinstance(v, dict)]
    if bad:
        raise UserError(
            f'recipe {path}: stage {bad[0]!r} must be an object of flags, e.g. {{"max_iters": 100}}'
        )
    for needed in ("prepare", "base"):
        if needed not in recipe:
            raise UserError(
                f"recipe {path} has no {needed!r} stage; every recipe prepares data and trains a base"
            )
    if "distill" in recipe and "teacher" not in recipe["distill"] and "teacher" not in recipe:
        raise UserError(f"recipe {path}: the distill stage needs a teacher (a SPEC, or a 'teacher' stage)")
    return recipe


def folders(work: Path) -> dict[str, Path]:
    """Where each stage writes, under WORK."""
    return {
        "prepare": work / "data",
        "base": work / "base",
        "teacher": work / "teacher",
        "distill": work / "distill",
        "eval": work / "eval.json",
        "bench": work / "bench",
        "export": work / "export",
    }


def final_run(recipe: dict[str, dict[str, Any]], work: Path) -> Path:
    """The run the later stages evaluate, bench and export: the distilled one, else the base."""
    return folders(work)["distill" if "distill" in recipe else "base"]


def _has_checkpoint(run: Path) -> bool:
    from nanogpt.folders import RunFolder

    return RunFolder(run).has_checkpoint()


@dataclass(frozen=True)
class RunOptions:
    """How every training stage runs: the recipe command's own flags, the same on a rerun."""

    threads: int | None = None
    backend: str = "torch"
    progress: bool = True

    def argv(self, name: str) -> list[str]:
        """The flags a training stage `name` gets from them (MLX only where the stage runs in MLX)."""
        out = ["--threads", str(self.threads)] if self.threads else []
        out += ["--backend", "mlx"] if self.backend == "mlx" and name in MLX_STAGES else []
        return out + ([] if self.progress else ["--no-progress"])


def _training_argv(
    name: str, opts: dict[str, Any], where: dict[str, Path], run_opts: RunOptions
) -> tuple[str, list[str]]:
    """The command and arguments of a training stage (base, teacher, distill)."""
    common = ["--data", str(where["prepare"]), "--out", str(where[name]), *run_opts.argv(name)]
    if name == "distill":
        opts = dict(opts)
        if "teacher" not in opts:
            opts["teacher"] = str(where["teacher"])
        return "distill", ["--student", str(where["base"]), *common, *flags(opts)]
    return "train", [*common, *flags(opts)]


def plan(
    recipe: dict[str, dict[str, Any]], work: Path, done: set[str], run_opts: RunOptions = RunOptions()
) -> list[Stage]:
    """The stages to run, in order, with their arguments, from the recipe and what WORK already holds."""
    where = folders(work)
    final = final_run(recipe, work)
    stages: list[Stage] = []
    for name in STAGES:
        if name not in recipe:
            continue
        opts = recipe[name]
        resume = False
        if name == "prepare":
            command, argv = "prepare", ["--out", str(where[name]), "--quiet", *flags(opts)]
        elif name in TRAINING:
            command, argv = _training_argv(name, opts, where, run_opts)
            resume = name not in done and _has_checkpoint(where[name])
            if resume:  # the run's own settings and data continue it exactly
                argv = ["--out", str(where[name]), "--resume", *run_opts.argv(name)]
        elif name == "eval":
            command = "eval"
            argv = [
                "--model",
                str(final),
                "--data",
                str(where["prepare"]),
                "--json",
                "--no-progress",
                *flags(opts),
            ]
            argv += ["--backend", "mlx"] if run_opts.backend == "mlx" else []
        elif name == "bench":
            command, argv = "bench", ["--out", str(where[name]), *flags(opts)]
        else:
            command, argv = "export", []
        argvs = export_argvs(recipe, work) if name == "export" else [argv]
        stages.append(Stage(name, command, argvs, done=name in done, resume=resume))
    return stages


def export_argvs(recipe: dict[str, dict[str, Any]], work: Path) -> list[list[str]]:
    """The export stage's commands: one per format (remote-code folder, GGUF file), from the final run."""
    where, final = folders(work), final_run(recipe, work)
    opts = dict(recipe.get("export", {}))
    formats = opts.pop("formats", ["remote-code", "gguf"])
    card = ["--bench", str(where["bench"])] if "bench" in recipe else []  # what the model card quotes
    card += ["--eval", str(where["eval"])] if "eval" in recipe else []
    argvs = []
    for fmt in formats:
        out = where["export"] / ("model.gguf" if fmt == "gguf" else fmt)
        extra = card if fmt != "gguf" else []
        argvs.append(["--model", str(final), "--out", str(out), "--format", fmt, *extra, *flags(opts)])
    return argvs


def recipe_hash(recipe: dict[str, dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def read_state(work: Path, digest: str, force: bool) -> set[str]:
    """The stages WORK has finished for this recipe; another recipe's WORK is refused unless --force."""
    path = work / STATE
    if not path.is_file():
        if work.exists() and any(work.iterdir()) and not force:
            raise UserError(
                f"--out {work} holds files but no {STATE}; choose another --out or pass --force to run the recipe there"
            )
        return set()
    try:
        state = json.loads(path.read_text())
        recorded, done = state["recipe"], set(state["done"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is unreadable; restore it, or choose another --out") from None
    if recorded != digest and not force:
        raise UserError(
            f"--out {work} was run with another recipe (its {STATE} says so); choose another --out, or pass "
            "--force to run this recipe there (finished stages are run again)"
        )
    return done if recorded == digest else set()


def write_state(work: Path, digest: str, done: list[str]) -> None:
    tmp = work / (STATE + ".tmp")
    tmp.write_text(json.dumps({"recipe": digest, "done": done}, indent=2) + "\n")
    os.replace(tmp, work / STATE)


def run_command(command: str, argv: list[str], capture: bool = False) -> str:
    """Run `nanogpt COMMAND ARGV` in this process; with `capture`, its stdout is returned (and echoed)."""
    import importlib

    main_fn = importlib.import_module(f"nanogpt.commands.{command}").main  # each stage's command: its module
    out = io.StringIO()
    with contextlib.redirect_stdout(out) if capture else contextlib.nullcontext():
        code = int(main_fn(argv) or 0)
    if capture:
        sys.stdout.write(out.getvalue())
    if code:
        raise UserError(f"nanogpt {command} exited with code {code}")
    return out.getvalue()


def run_stage(stage: Stage, work: Path) -> None:
    for argv in stage.argvs:
        text = run_command(stage.command, argv, capture=stage.name == "eval")
        if stage.name == "eval":  # the held-out figures, for the record and the export's card
            folders(work)["eval"].write_text(text.strip().splitlines()[-1] + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="nanogpt recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", type=Path, help="the recipe file (JSON), e.g. configs/recipe_builtin.json")
    p.add_argument("--out", type=Path, required=True, help="the work folder: every stage writes under it")
    p.add_argument(
        "--force", action="store_true", help="run in an --out of another recipe (or of other files)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan (each stage's command) and stop")
    add_threads(p, help="torch CPU threads for the training stages (the same on a rerun: exact resume)")
    add_backend(p, help="PyTorch (default) or Apple MLX for every stage that runs in MLX")
    p.add_argument("--no-progress", action="store_true", help="no progress bars in the training stages")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    recipe = read_recipe(args.recipe)
    digest = recipe_hash(recipe)
    done = read_state(args.out, digest, args.force)
    run_opts = RunOptions(args.threads, args.backend, not args.no_progress)
    stages = plan(recipe, args.out, done, run_opts)
    rerun = f"nanogpt recipe {args.recipe} --out {args.out}" + (
        f" --threads {args.threads}" if args.threads else ""
    )
    rerun += " --backend mlx" if args.backend == "mlx" else ""
    rerun += " --no-progress" if args.no_progress else ""
    for i, stage in enumerate(stages, 1):
        what = "done, skipped" if stage.done else ("continuing from its checkpoint" if stage.resume else "")
        commands = "; ".join(f"nanogpt {stage.command} " + " ".join(argv) for argv in stage.argvs)
        print(f"== {i}/{len(stages)} {stage.name}: {commands}" + (f"  ({what})" if what else ""), flush=True)
        if args.dry_run or stage.done:
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        try:
            run_stage(stage, args.out)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"stage {stage.name} interrupted; continue with `{rerun}`") from None
        except UserError as e:
            raise UserError(f"stage {stage.name} failed: {e}; then continue with `{rerun}`") from None
        done.add(stage.name)
        write_state(args.out, digest, [s.name for s in stages if s.name in done])
    if not args.dry_run:
        print(
            f"recipe done: {args.out} (final run {final_run(recipe, args.out)}, exports in {folders(args.out)['export']})"
        )
    return 0
