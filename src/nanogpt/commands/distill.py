"""The `nanogpt distill` command: flags, the run's teacher settings (kept for --resume), and `main`.

Training settings come from the card's distillation stage (`BASE_TRAIN`), the run's own on --resume,
`--preset`, then flags; teacher settings from TEACHER_DEFAULTS, the run's `distill.json` on --resume,
then flags. The teacher and its loss are `nanogpt.distill.teachers.make_loss_fn`; training is the
trainer's (`nanogpt.train.train` with `init_from=student`).

    nanogpt distill --student runs/base --teacher runs/big --data data/builtin --out runs/kd --max-iters 500
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from nanogpt.commands.options import add_backend, add_dtype, add_threads, add_tracker, apply_threads
from nanogpt.commands.train import add_train_config_flags
from nanogpt.config import ModelConfig, TrainConfig, override, read_json
from nanogpt.data.tokenizer import VOCAB_SIZE
from nanogpt.distill.client import cached_answers
from nanogpt.distill.losses import CROSS_VOCAB_METHODS, DIVERGENCES, TEACHER_SPECS
from nanogpt.distill.teachers import TeacherSettings, TeacherSpec, api_config, make_loss_fn, parse_teacher
from nanogpt.errors import ArgumentParser, SettingError, UserError, flags_for_settings
from nanogpt.folders import RunFolder, claim
from nanogpt.train.checkpoint import load_config_of, saved_data_dir
from nanogpt.train.lineage import public_spec
from nanogpt.train.loop import TrainResult, train
from nanogpt.train.tracking import check_installed, parse_trackers

# `--preset card`: the card's distillation stage. Without it the same lr applies (the card's 3e-5).
DISTILL_PRESETS: dict[str, dict[str, Any]] = {
    "card": dict(
        max_iters=15000,
        learning_rate=3e-5,
        min_lr=3e-5,
        warmup_iters=0,
        batch_size=12,
        distill_alpha=0.5,
        distill_temperature=1.0,
    ),
}
# the teacher flags a run keeps in its distill.json; None = unset, so --resume keeps the run's own
TEACHER_DEFAULTS: dict[str, Any] = {
    "teacher": None,
    "kind": TeacherSettings().method,  # --kind: the distillation method
    **{
        k: getattr(TeacherSettings(), k)
        for k in ("beta", "top_k", "prompts", "prompt_tokens", "reply_tokens")
    },
}
BASE_TRAIN = TrainConfig(learning_rate=3e-5, min_lr=3e-5, warmup_iters=0, max_iters=15000)
# the flag of each setting the distill library names in a refusal (`SettingError.with_flags`)
FLAGS = {
    "teacher": "--teacher",
    "method": "--kind",
    "alpha": "--alpha",
    "temperature": "--temperature",
    "beta": "--beta",
    "dtype": "--teacher-dtype",
    "top_k": "--top-k",
    "prompts": "--prompts",
    "prompt_tokens": "--prompt-tokens",
    "reply_tokens": "--reply-tokens",
    "skip_bad": "--skip-bad",
    "api_key_env": "--api-key-env",
    "concurrency": "--concurrency",
    "timeout": "--timeout",
    "retries": "--retries",
    "cache_dir": "--cache-dir",
}


def flagged(text: str) -> str:
    """A library text (a refusal, TEACHER_SPECS) as this command says it: each marked setting as its flag."""
    return str(SettingError("", text).with_flags(FLAGS))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="nanogpt distill",
        description="Distil a teacher into a student checkpoint (the card's second stage). Teacher SPEC: "
        + flagged(TEACHER_SPECS),
    )
    p.add_argument("--student", help="student run or checkpoint folder (its weights start the run)")
    p.add_argument("--teacher", help="teacher SPEC: a folder, completions:MODEL@URL or chat:MODEL@URL")
    p.add_argument("--data", help="prepared data folder (`nanogpt prepare`)")
    p.add_argument("--out", required=True, help="run folder to create (or continue with --resume)")
    p.add_argument("--preset", choices=list(DISTILL_PRESETS), help="card: 15K iterations, lr 3e-5, alpha 0.5")
    p.add_argument("--alpha", type=float, help="weight of the hard loss (default 0.5)")
    p.add_argument("--temperature", type=float, help="softmax temperature T (default 1)")
    p.add_argument(
        "--kind",
        choices=(*DIVERGENCES, *CROSS_VOCAB_METHODS),
        help="local teacher: a divergence (same vocabulary; default forward_kl), or for a teacher of any "
        "vocabulary (HF folder, .gguf): uld (logits at aligned positions) or sequence (it writes text)",
    )
    p.add_argument("--beta", type=float, help="jsd mixture weight (default 0.5)")
    add_dtype(p, flag="--teacher-dtype", help="local teacher precision (autocast)")
    add_backend(p, help="PyTorch (default) or Apple MLX (fp32 student; every teacher kind)")
    p.add_argument("--resume", action="store_true", help="continue OUT from OUT/last/")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace whatever is at --out (else only a run with no checkpoint)",
    )
    add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--teacher-batch",
        type=int,
        default=8,
        help="--kind sequence: prompts per local teacher generate call",
    )
    add_tracker(p)
    api = p.add_argument_group("API teachers (completions:/chat:)")
    # defaults in TEACHER_DEFAULTS; None = unset, so that --resume keeps the run's own settings
    api.add_argument("--top-k", type=int, help="top-k logprobs asked per position (completions; default 20)")
    api.add_argument(
        "--api-key-env",
        help="env var holding the API key, which must then be set (never logged; default: OPENAI_API_KEY if set)",
    )
    api.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    api.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    api.add_argument("--retries", type=int, default=5, help="retries per request (exponential backoff)")
    api.add_argument("--skip-bad", action="store_true", help="count and skip bad answers instead of stopping")
    api.add_argument("--cache-dir", help="teacher answers cache + chat data (default: OUT.teacher)")
    api.add_argument(
        "--prompts", type=int, help="chat/sequence: prompts drawn from the training split (default 256)"
    )
    api.add_argument("--prompt-tokens", type=int, help="chat/sequence: tokens per prompt (default 64)")
    api.add_argument(
        "--reply-tokens", type=int, help="chat/sequence: max tokens per teacher reply (default 256)"
    )
    add_train_config_flags(
        p, skip_prefix="distill_", presets=False
    )  # defaults: the card's distillation stage
    return p


def resolve_train_config(args: argparse.Namespace) -> TrainConfig:
    """BASE_TRAIN, then the run's saved config on --resume, then --preset, then flags."""
    cfg = BASE_TRAIN
    saved = RunFolder(Path(args.out)).train_config
    if args.resume and saved.is_file():
        cfg = TrainConfig.from_dict(read_json(saved, "training config"))
    if args.preset:
        cfg = override(cfg, **DISTILL_PRESETS[args.preset])
    flags = {
        f.name: getattr(args, f.name, None) for f in fields(TrainConfig) if not f.name.startswith("distill_")
    }
    return override(cfg, **flags, distill_alpha=args.alpha, distill_temperature=args.temperature)


def teacher_settings(args: argparse.Namespace) -> TeacherSettings:
    """The teacher flags (unset ones already filled by `resolve_teacher_settings`) as TeacherSettings."""
    return TeacherSettings(
        method=args.kind,
        beta=args.beta,
        dtype=args.teacher_dtype,
        top_k=args.top_k,
        prompts=args.prompts,
        prompt_tokens=args.prompt_tokens,
        reply_tokens=args.reply_tokens,
        teacher_batch=args.teacher_batch,
        skip_bad=args.skip_bad,
        api_key_env=args.api_key_env,
        concurrency=args.concurrency,
        timeout=args.timeout,
        retries=args.retries,
    )


def rerun_hint(run: Path) -> str:
    """What to do once a down teacher is back: --resume only when OUT holds a checkpoint to resume."""
    if RunFolder(run).has_checkpoint():
        return "then rerun with --resume (answers already received are cached)"
    return "then rerun the same command once it is reachable (answers already received are cached)"


# flag -> (lowest, highest) for the integer teacher settings; top-k's range is TopKDistillLoss's
TEACHER_INT_RANGES = {
    "top_k": (1, VOCAB_SIZE),
    "prompts": (1, 10**6),
    "prompt_tokens": (4, 10**5),
    "reply_tokens": (1, 10**6),
    "teacher_batch": (1, 4096),
}


def resolve_teacher_settings(args: argparse.Namespace, saved: Path) -> TeacherSpec:
    """Fill unset teacher flags from the run's distill.json (on --resume), else TEACHER_DEFAULTS; check them
    all (nothing is written for a bad one), save them, and return the parsed --teacher."""
    if saved.parent.exists() and not saved.parent.is_dir():
        raise UserError(f"teacher folder {saved.parent} is a file; move it away or give another --cache-dir")
    try:
        old = json.loads(saved.read_text()) if args.resume and saved.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        old = e
    if not isinstance(old, dict):
        raise UserError(
            f"the run's teacher settings {saved} are unreadable; restore that file, or pass --teacher and the "
            "other teacher flags again after moving it away"
        )
    for name, default in TEACHER_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, old.get(name, default))
    if args.teacher is None:
        raise UserError("--teacher SPEC is required: a local folder, completions:MODEL@URL or chat:MODEL@URL")
    if not isinstance(args.teacher, str):  # only a hand-edited distill.json gets here
        raise UserError(f"{saved} holds a teacher that is not a SPEC string; pass --teacher SPEC again")
    spec = parse_teacher(args.teacher)
    for name, (lo, hi) in TEACHER_INT_RANGES.items():
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {value!r} is out of range: give an integer in [{lo}, {hi}]")
    api = api_config(spec, teacher_settings(args))  # ranges of --timeout, --retries, --concurrency
    if spec.source != "local":
        api.api_key()  # an unset --api-key-env variable stops the run before anything is written
    saved.parent.mkdir(parents=True, exist_ok=True)
    record = {name: getattr(args, name) for name in TEACHER_DEFAULTS}
    saved.write_text(json.dumps({**record, "student": args.student or old.get("student")}, indent=2) + "\n")
    return spec


def distill_stage(args: argparse.Namespace, cfg: TrainConfig) -> dict[str, object]:
    """This stage as the run's lineage records it: the teacher's SPEC (without any secret), method, alpha, T."""
    teacher = {
        "spec": public_spec(args.teacher),
        "method": args.kind,
        "alpha": cfg.distill_alpha,
        "temperature": cfg.distill_temperature,
    }
    return {"name": "distill", "teacher": teacher}


def drop_unused_teacher_folder(cache_dir: Path, run: Path) -> None:
    """After a failed run that created `cache_dir`: remove it unless it holds answers, data or a log worth
    keeping, or OUT has a checkpoint whose --resume needs its distill.json."""
    kept = ("distill_log.jsonl", "chat_data")
    if RunFolder(run).has_checkpoint() or any((cache_dir / k).exists() for k in kept):
        return
    if cached_answers(cache_dir / "cache.sqlite") == 0:
        shutil.rmtree(cache_dir, ignore_errors=True)


def teacher_loss(
    args: argparse.Namespace,
    spec: TeacherSpec,
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    data: str,
    cache_dir: Path,
) -> tuple[Any, Callable[..., TrainResult]]:
    """The distillation loss for --backend and the trainer that takes it (both take the same arguments)."""
    make: Callable[..., Any] = make_loss_fn
    trainer: Callable[..., TrainResult] = train
    if args.backend == "mlx":
        from nanogpt.mlx.train.loop import train as mlx_train  # first: says how to install MLX if missing

        trainer = mlx_train
        from nanogpt.distill.mlx_teachers import make_mlx_loss_fn

        make = make_mlx_loss_fn
    loss = make(
        spec,
        teacher_settings(args),
        cfg,
        model_cfg,
        data,
        cache_dir,
        down_hint=lambda: rerun_hint(Path(args.out)),
        wording=lambda e: flagged(str(e)),
    )
    return loss, trainer


def main(argv: list[str] | None = None) -> int:
    with flags_for_settings(FLAGS):  # the library names its settings; this command names their flags
        return distill(build_parser().parse_args(argv))


def distill(args: argparse.Namespace) -> int:
    apply_threads(args)
    trackers = parse_trackers(args.tracker)
    check_installed(trackers)
    run = Path(args.out)
    if not args.resume and not args.student:
        raise UserError(
            "--student RUN is required: the checkpoint whose weights the distillation starts from"
        )
    model_cfg = load_config_of(run if args.resume and RunFolder(run).config.is_file() else args.student)
    cfg = resolve_train_config(args)
    data = args.data
    if data is None and args.resume:
        data = args.data = saved_data_dir(run)
    if data is None:
        raise UserError("--data DIR is required: a folder made by `nanogpt prepare`")
    cache_dir = Path(args.cache_dir) if args.cache_dir else run.with_name(run.name + ".teacher")
    if not args.resume:  # before any teacher work: train() checks again, under the run lock
        claim(run, "run", force=args.force)
    created = not cache_dir.exists()
    try:
        spec = resolve_teacher_settings(args, cache_dir / "distill.json")
        loss_fn, trainer = teacher_loss(args, spec, cfg, model_cfg, data, cache_dir)
        result = trainer(
            model_cfg,
            cfg,
            data,
            run,
            resume=args.resume,
            force=args.force,
            init_from=args.student,
            progress=not args.no_progress,
            loss_fn=loss_fn,
            loss_log=loss_fn.log,  # the hard/soft halves: stepped, trimmed on resume, logged as train_ce
            trackers=trackers,
            label="distill" + (" (mlx)" if args.backend == "mlx" else ""),
            stage=distill_stage(args, cfg),
        )
    except BaseException:
        if created:  # a failed run leaves no empty OUT.teacher/ behind, and never touches an earlier one
            drop_unused_teacher_folder(cache_dir, run)
        raise
    skipped = getattr(loss_fn, "skipped", 0)
    best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
    print(
        f"{result.run_dir}: {result.steps} distillation steps, best val loss {best}"
        + (f", {skipped} teacher answers skipped" if skipped else ""),
        file=sys.stdout,
    )
    return 0
