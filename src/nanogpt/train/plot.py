"""A run's log (`RUN/log.jsonl`, one JSON object per line) and its loss curve (`RUN/loss.png`).

The trainer appends one line per logged step (`step`, `loss`, `lr`, `tokens`, `tokens_per_s`, `mfu`,
`val_loss`/`val_ppl` on eval steps, and `train_ce` in a distillation); this module reads it back, trims it
on resume, and draws it.
matplotlib is imported lazily (Agg backend, no display needed) so training never pays for it up front.

    plot_run("runs/demo")  # -> runs/demo/loss.png, also `nanogpt train --plot runs/demo`
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanogpt.errors import UserError
from nanogpt.folders import RunFolder


def append_log(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line, flushed so a kill loses at most the line being written."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a log file; a torn last line (a kill mid-write) is skipped, not an error."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def truncate_log(path: Path, max_step: int) -> int:
    """Keep only records with step <= max_step (the resumed checkpoint's); returns how many were dropped.

    Lines written after the checkpoint will be produced again by the resumed run, so keeping them would
    duplicate steps. The file is rewritten atomically.
    """
    records = read_log(path)
    kept = [r for r in records if r["step"] <= max_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return len(records) - len(kept)


@dataclass(frozen=True)
class Curve:
    """One line of the loss plot: what it is, its points, and how it is drawn (matplotlib `plot` keywords)."""

    label: str
    steps: list[int]
    values: list[float]
    style: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LossPlot:
    """What `plot_log` draws, decided apart from the drawing (so that a test can read it)."""

    curves: list[Curve]
    ylabel: str
    title: str


def _curve(records: list[dict[str, Any]], key: str, label: str, **style: Any) -> Curve | None:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return Curve(label, [s for s, _ in points], [v for _, v in points], style) if points else None


def loss_plot(records: list[dict[str, Any]], title: str = "") -> LossPlot:
    """The curves of a run's log. A distillation logs `train_ce` (the hard part: cross-entropy on the data)
    beside `loss`, the mixture it minimises (alpha * hard + (1 - alpha) * soft, not a cross-entropy): the
    held-out CE is compared with `train_ce`, and the mixture is drawn faintly under its own name."""
    line: dict[str, Any] = dict(linewidth=1.0, alpha=0.8)
    dots: dict[str, Any] = dict(marker="o", markersize=3, linewidth=1.5)
    if any(r.get("train_ce") is not None for r in records):
        faint: dict[str, Any] = dict(linewidth=0.8, alpha=0.45, linestyle="--")
        plan: list[tuple[str, str, dict[str, Any]]] = [
            ("loss", "distillation loss: α·hard + (1−α)·soft (minimised)", faint),
            ("train_ce", "train CE on the data (the hard part)", line),
            ("val_loss", "val CE (held out)", dots),
        ]
        ylabel, title = "nats/token", f"{title or 'loss'}: distillation"
    else:
        plan = [("loss", "train", line), ("val_loss", "val", dots)]
        ylabel, title = "cross-entropy loss (nats/token)", title or "loss"
    curves = [c for key, label, style in plan if (c := _curve(records, key, label, **style)) is not None]
    return LossPlot(curves, ylabel, title)


def plot_log(records: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """Draw the run's losses against step into `out` (PNG): `loss_plot`'s curves."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works on a headless server
    import matplotlib.pyplot as plt

    plan = loss_plot(records, title)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for c in plan.curves:
        ax.plot(c.steps, c.values, label=c.label, **c.style)
    ax.set_xlabel("step")
    ax.set_ylabel(plan.ylabel)
    ax.set_title(plan.title)
    ax.grid(True, alpha=0.3)
    if plan.curves:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_run(run_dir: str | Path) -> Path:
    """Regenerate `RUN/loss.png` from `RUN/log.jsonl` (no training)."""
    run = Path(run_dir)
    log = RunFolder(run).log
    records = read_log(log)
    if not records:
        raise UserError(f"{log} not found or empty; pass a run folder written by `nanogpt train`")
    return plot_log(records, RunFolder(run).plot, title=run.name)
