"""A run's log (`RUN/log.jsonl`, one JSON object per line) and its loss curve (`RUN/loss.png`).

The trainer appends one line per logged step (`step`, `loss`, `lr`, `tokens`, `tokens_per_s`, `mfu`, and
`val_loss`/`val_ppl` on eval steps); this module reads it back, trims it on resume, and draws it.
matplotlib is imported lazily (Agg backend, no display needed) so training never pays for it up front.

    plot_run("runs/demo")  # -> runs/demo/loss.png, also `nanogpt train --plot runs/demo`
"""

from __future__ import annotations

import json
import os
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


def plot_log(records: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """Draw train and val loss against step into `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works on a headless server
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1.0, alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), label="val", marker="o", markersize=3, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(True, alpha=0.3)
    if train or val:
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
