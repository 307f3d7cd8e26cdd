"""Where a run came from: the stages before it (a base run, then a distillation...), for the exported card.

A run started from another (`train --init-from`, `distill --student`) writes `RUN/lineage.json` as it starts:
the earlier stages' records, oldest first, and what this stage is (`stage`: its name, and a distillation's
teacher). Each stage keeps its own step counter and schedule, so resuming and the learning rate are as in any
run; the lineage only adds up. A stage's record is read from its run folder when asked (`stage_record`):
data and tokens, iterations, learning rate, final train and held-out loss, so a record is never stale.

    write_lineage(run, parent="runs/base", stage={"name": "distill", "teacher": {...}})
    stages = read_lineage("runs/distilled/best")   # [base's record, distill's record]
    sum(s["iterations"] for s in stages)           # the card's "checkpoint 35000"
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from nanogpt.folders import STATE_JSON, RunFolder, recover_dir
from nanogpt.train.plot import read_log

LINEAGE = "lineage.json"


def run_of(path: str | Path) -> Path:
    """The run folder of a checkpoint path: RUN itself, or RUN for RUN/best and RUN/last (or their .old)."""
    p = Path(path)
    return p.parent if p.name in ("best", "last", "best.old", "last.old") else p


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return float(values[-1]) if values else None


def stage_record(run: str | Path) -> dict[str, Any]:
    """What one stage did, read from its run folder (its lineage's `stage` facts first)."""
    folder = RunFolder(run_of(run))
    cfg, model = _json(folder.train_config), _json(folder.config)
    state = _json(recover_dir(folder.last) / STATE_JSON)
    log = read_log(folder.log) if folder.log.is_file() else []
    own = _json(folder.path / LINEAGE).get("stage", {})
    record: dict[str, Any] = {"name": own.get("name", "train"), "run": str(folder.path)}
    record.update({k: v for k, v in own.items() if k != "name"})
    record.update(
        data=state.get("data_dir"),
        tokens=state.get("tokens"),
        iterations=state.get("step", 0),
        learning_rate=cfg.get("learning_rate"),
        batch=f"{cfg.get('batch_size')} x {model.get('context_length')}" if cfg and model else None,
        final_train_loss=_last(log, "train_ce") or _last(log, "loss"),
        final_val_loss=_last(log, "val_loss"),
    )
    return record


def read_lineage(path: str | Path) -> list[dict[str, Any]]:
    """Every stage that led to the checkpoint or run at `path`, oldest first, this run's own last."""
    run = run_of(path)
    if not RunFolder(run).train_config.is_file():
        return []  # a bare checkpoint (an import, a file from elsewhere): no stages known
    earlier = _json(run / LINEAGE).get("parents", [])
    return [*[s for s in earlier if isinstance(s, dict)], stage_record(run)]


def write_lineage(run: Path, parent: str | Path | None, stage: dict[str, Any]) -> None:
    """RUN/lineage.json for a run that starts now: its parent's stages and what this stage is."""
    parents = read_lineage(parent) if parent is not None else []
    if not parents and stage.get("name", "train") == "train":
        return  # a run from scratch, or from a checkpoint with no history: nothing to record
    tmp = run / (LINEAGE + ".tmp")
    tmp.write_text(json.dumps({"parents": parents, "stage": stage}, indent=2) + "\n")
    os.replace(tmp, run / LINEAGE)


def public_spec(spec: str) -> str:
    """A teacher SPEC as it may be published: a URL's user, password, query and fragment dropped."""
    head, at, url = spec.partition("@")  # kind:MODEL@URL; a URL's own "@" (user:pass@host) comes later
    if not at or "://" not in url:
        return spec if "://" not in spec else _strip(spec)
    return f"{head}@{_strip(url)}"


def _strip(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def total_iterations(stages: list[dict[str, Any]]) -> int:
    """The iterations of every stage added up: the checkpoint number the card quotes (35,000)."""
    return sum(int(s.get("iterations") or 0) for s in stages)
