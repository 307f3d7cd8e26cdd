"""The run's story for the playground (`GET /v1/nanogpt/run`): what the served model is and how it was trained.

Read from the folder `nanogpt serve --model` was given, when asked (a run still training shows its newest
log): the config, the parameter counts as `nanogpt info` prints them, the lineage (`train.lineage`), the
held-out perplexity and the loss curve of `log.jsonl`. A checkpoint folder without its run (an import, a
copied `best/`) has only the config and the counts; every other part is then null.

    story = run_story(Path("runs/demo"), engine.cfg, dtype="int8")
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from nanogpt.config import ModelConfig
from nanogpt.folders import RunFolder
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.serve.requests import DEFAULT_CHAT_MAX_TOKENS, DEFAULT_MAX_TOKENS
from nanogpt.train.checkpoint import resolve_checkpoint
from nanogpt.train.lineage import read_lineage, run_of
from nanogpt.train.plot import read_log

DEMO_JSON = "demo.json"  # `nanogpt demo`'s figures, beside the run's log


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Unique parameters, and the card's count with the tied embedding counted twice (as `nanogpt info`)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = NanoGPTLMHeadModel(cfg)
    return {"unique": model.num_params(unique=True), "counted_twice": model.num_params(unique=False)}


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def loss_curve(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(step, loss, val_loss) of every logged step; a value a step did not log is null."""
    return [
        {"step": r["step"], "loss": _finite(r.get("loss")), "val_loss": _finite(r.get("val_loss"))}
        for r in log
        if isinstance(r.get("step"), int)
    ]


def held_out(checkpoint: Path, log: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The held-out perplexity the run measured for the served weights, and where it comes from.

    `best/` holds the weights of the lowest held-out loss, so its figure is that evaluation's; any other
    checkpoint is the run's last evaluation. `nanogpt demo` also scores the val split with a sliding window
    (`demo.json`): that figure is added when present.
    """
    evals = [r for r in log if _finite(r.get("val_loss")) is not None]
    out: dict[str, Any] = {}
    if evals:
        ev = min(evals, key=lambda r: r["val_loss"]) if checkpoint.name in ("best", "best.old") else evals[-1]
        out = {"perplexity": math.exp(ev["val_loss"]), "loss": ev["val_loss"], "step": ev["step"]}
        out["source"] = "log.jsonl: the held-out loss of the training run's evaluation at this step"
    demo = run_of(checkpoint) / DEMO_JSON
    try:
        sliding = _finite(json.loads(demo.read_text()).get("final_val_ppl"))
    except (OSError, ValueError, AttributeError):
        sliding = None
    if sliding is not None:
        out["sliding_window_perplexity"] = sliding  # `nanogpt demo`'s score of the val split
    return out or None


def sampling_defaults() -> dict[str, Any]:
    """What this server samples with when a request leaves a field out (`requests.parse_request`)."""
    return {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": None,
        "seed": None,
        "max_tokens": DEFAULT_MAX_TOKENS,
        "chat_max_tokens": DEFAULT_CHAT_MAX_TOKENS,
    }


def run_story(model_path: Path | None, cfg: ModelConfig, name: str, dtype: str) -> dict[str, Any]:
    """The answer of `GET /v1/nanogpt/run` (docs/serving.md, "The playground's endpoints")."""
    story: dict[str, Any] = {
        "model": name,
        "dtype": dtype,
        "config": cfg.to_dict(),
        "parameters": parameter_counts(cfg),
        "defaults": sampling_defaults(),
        "lineage": None,
        "held_out": None,
        "loss_curve": None,
    }
    if model_path is None:  # an engine made in code, not from a folder
        return story
    log_file = RunFolder(run_of(model_path)).log
    log = read_log(log_file)
    story["lineage"] = read_lineage(model_path) or None
    story["held_out"] = held_out(resolve_checkpoint(model_path), log)  # the folder it loaded
    story["loss_curve"] = loss_curve(log) if log_file.is_file() else None
    return story
