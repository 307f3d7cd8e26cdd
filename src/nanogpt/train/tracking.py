"""Experiment trackers: the run log's scalars, mirrored live to TensorBoard, Weights & Biases or MLflow.

`RunLog.append` is the one place a training record is written: the line goes to `RUN/log.jsonl`, then its
numbers go to every tracker at the record's step. Each tracker also gets the model and training configs at
the start, and is closed when the session ends, by success, error or Ctrl-C (with that status where the
tool keeps one). A resumed run continues the same tracker run: TensorBoard writes the same `RUN/tensorboard`
folder and purges the steps past the checkpoint; W&B and MLflow reopen the run whose id `RUN/trackers.json`
saved. The trackers are optional extras, imported only when named.

    with open_run_log(RunFolder(run), ("tensorboard",), configs, resume_step=None) as log:
        log.append({"step": 1, "loss": 10.9})
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from nanogpt.errors import UserError, missing_extra
from nanogpt.folders import RunFolder
from nanogpt.train.plot import append_log

TRACKERS = ("tensorboard", "wandb", "mlflow")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}
# MLflow's database stores (SQLAlchemy URIs, `sqlite:///mlflow.db` its default since MLflow 3)
_MLFLOW_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
Configs = dict[str, dict[str, Any]]  # {"model": ModelConfig.to_dict(), "train": TrainConfig.to_dict()}


def parse_trackers(values: Sequence[str] | None) -> tuple[str, ...] | None:
    """`--tracker` values (repeated and/or comma lists) as names; None when the flag was not given.

    `none` turns tracking off (also for a resumed run that used trackers).
    """
    if values is None:
        return None
    names = [n.strip().lower() for v in values for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in (*TRACKERS, "none")]
    if unknown:
        raise UserError(
            f"unknown tracker {unknown[0]!r}; use {', '.join(TRACKERS)} or none (repeat --tracker or give a comma list)"
        )
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def check_installed(names: Sequence[str] | None) -> None:
    """Refuse a tracker whose package is missing before any work (the run folder is not written yet)."""
    for name in names or ():
        if importlib.util.find_spec(name) is None:  # each tracker's module is named as the flag
            raise missing_extra(f"--tracker {name} needs the {_PACKAGES[name]} package", "track")
        if name == "mlflow":
            _check_mlflow_store(os.environ.get("MLFLOW_TRACKING_URI") or None)


def _check_mlflow_store(uri: str | None) -> None:
    """Refuse a database store (`uri`; None: MLflow 3's default, SQLite in ./mlflow.db) that mlflow-skinny
    cannot open: it registers them only where sqlalchemy imports (and alembic creates the tables), else
    MLflow fails later with a message about its model registry."""
    scheme = (uri or "sqlite:").split(":", 1)[0].split("+", 1)[0].lower()
    missing = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
    if scheme in _MLFLOW_DB_SCHEMES and missing:
        where = uri or "its default store, SQLite in ./mlflow.db"
        raise missing_extra(
            f"--tracker mlflow keeps runs in {where}, which needs {' and '.join(missing)} "
            "(or set MLFLOW_TRACKING_URI to a tracking server)",
            "track",
        )


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers (not its step, not a missing grad norm) as floats."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


def _config_params(configs: Configs) -> dict[str, str]:
    """The configs flattened to `model.d_model`-style keys, for tools whose parameters are flat strings."""
    return {f"{group}.{k}": json.dumps(v) for group, d in configs.items() for k, v in d.items()}


class Tracker(Protocol):
    name: str  # as --tracker spells it
    saved: dict[str, Any]  # what reopens this tracker's run on resume (kept in RUN/trackers.json)

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self, status: str) -> None:
        """`status`: finished, interrupted (Ctrl-C) or failed."""
        ...


class TensorBoard:
    """Scalars in `RUN/tensorboard` (`tensorboard --logdir runs` shows every run); configs as text."""

    name = "tensorboard"

    def __init__(self, folder: RunFolder, configs: Configs, resume_step: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_extra("--tracker tensorboard needs the tensorboard package", "track") from None
        # purge_step: events a killed session wrote past the checkpoint are dropped when the run is read
        purge = None if resume_step is None else resume_step + 1
        self._w = SummaryWriter(str(folder.tensorboard), purge_step=purge)
        for group, d in configs.items():  # indented: TensorBoard renders text as Markdown, this as code
            text = "\n".join("    " + line for line in json.dumps(d, indent=2).splitlines())
            self._w.add_text(f"config/{group}", text, resume_step or 0)
        self.saved: dict[str, Any] = {"log_dir": folder.tensorboard.name}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self._w.add_scalar(k, v, step)

    def close(self, status: str) -> None:
        self._w.close()


class Wandb:
    """A W&B run named after the run folder, its files under `RUN/wandb` (or `WANDB_DIR`).

    W&B's own step only grows, so the x axis is our `step` (`define_metric`): steps replayed after a
    resume are kept, not dropped. `WANDB_MODE=offline` keeps everything local (`wandb sync` uploads later).
    """

    name = "wandb"

    def __init__(self, folder: RunFolder, configs: Configs, saved: dict[str, Any] | None) -> None:
        try:
            import wandb
        except ImportError:
            raise missing_extra("--tracker wandb needs the wandb package", "track") from None
        project = (saved or {}).get("project") or os.environ.get("WANDB_PROJECT") or "nanogpt"
        self._run = wandb.init(
            project=project,
            name=folder.path.name,
            id=(saved or {}).get("id"),
            resume="allow" if saved else None,
            dir=None if os.environ.get("WANDB_DIR") else str(folder.path),
            config=configs,
            # the configs of this session win (flags given on resume may change training settings)
            allow_val_change=True,
        )
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")
        self.saved = {"id": self._run.id, "project": project}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log({"step": step, **scalars})

    def close(self, status: str) -> None:
        self._run.finish(exit_code={"finished": 0, "interrupted": 130}.get(status, 1))


class Mlflow:
    """An MLflow run named after the run folder, in experiment `MLFLOW_EXPERIMENT_NAME` (default nanogpt).

    The store is MLflow's own choice: `MLFLOW_TRACKING_URI`, else MLflow 3's default, SQLite in
    `./mlflow.db` with artifacts in `./mlruns` (what `mlflow ui` started in that folder shows; the `track`
    extra installs what mlflow-skinny needs to open it). A resumed run reopens the saved run id in the store
    it was created in. Configs go in as parameters (at the first session) and as `configs.json`.
    """

    name = "mlflow"
    _STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}

    def __init__(self, folder: RunFolder, configs: Configs, saved: dict[str, Any] | None) -> None:
        try:
            import mlflow
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise missing_extra("--tracker mlflow needs the mlflow-skinny package", "track") from None
        from mlflow.exceptions import MlflowException

        uri = (saved or {}).get("tracking_uri") or mlflow.get_tracking_uri()
        _check_mlflow_store(uri)  # a resumed run's saved store, too
        self._client = client = MlflowClient(tracking_uri=uri)
        run_id = (saved or {}).get("run_id")
        if run_id is not None:
            try:
                client.update_run(run_id, status="RUNNING")
            except MlflowException as e:
                print(
                    f"warning: cannot reopen MLflow run {run_id} ({_first_line(e)}): starting a new one",
                    file=sys.stderr,
                )
                run_id = None
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "nanogpt"
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
            run_id = client.create_run(exp_id, run_name=folder.path.name).info.run_id
            params = [Param(k, v) for k, v in _config_params(configs).items()]
            for i in range(0, len(params), 100):  # a tracking server takes at most 100 per request
                client.log_batch(run_id, params=params[i : i + 100])
        client.log_dict(run_id, configs, "configs.json")  # this session's: flags given on resume win
        self._run_id = run_id
        self.saved = {"run_id": run_id, "tracking_uri": uri}

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self, status: str) -> None:
        self._client.set_terminated(self._run_id, self._STATUS[status])


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class RunLog:
    """`RUN/log.jsonl` and the trackers; a tracker that fails while logging is dropped with one warning
    (a dashboard outage never stops a training run)."""

    def __init__(self, path: Path, trackers: Iterable[Tracker] = ()) -> None:
        self.path = path
        self.trackers = list(trackers)

    def append(self, record: dict[str, Any]) -> None:
        append_log(self.path, record)
        scalars = _scalars(record)
        for t in list(self.trackers):
            try:
                t.log(int(record["step"]), scalars)
            except Exception as e:  # any failure of a third-party tool
                self.trackers.remove(t)
                print(f"warning: --tracker {t.name} stopped logging ({_first_line(e)})", file=sys.stderr)

    def close(self, status: str) -> None:
        for t in self.trackers:
            try:
                t.close(status)
            except Exception as e:  # the run is over anyway: say so, close the others
                print(
                    f"warning: --tracker {t.name} did not close cleanly ({_first_line(e)})", file=sys.stderr
                )
        self.trackers = []


def _read_saved(folder: RunFolder) -> dict[str, Any]:
    """`RUN/trackers.json`: {"trackers": names the last session used, "runs": {name: what reopens its run}}."""
    try:
        saved = json.loads(folder.trackers.read_text()) if folder.trackers.is_file() else {}
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict) or not isinstance(saved.get("runs", {}), dict):
        raise UserError(
            f"{folder.trackers} is unreadable; move it away (the run's trackers then start new runs)"
        )
    return saved


def _open(
    name: str, folder: RunFolder, configs: Configs, saved: dict[str, Any] | None, resume_step: int | None
) -> Tracker:
    try:
        if name == "tensorboard":
            return TensorBoard(folder, configs, resume_step)
        if name == "wandb":
            return Wandb(folder, configs, saved)
        return Mlflow(folder, configs, saved)
    except UserError:
        raise
    except Exception as e:  # a tool's own setup error: no login, a bad store URI, ...
        raise UserError(
            f"--tracker {name} could not start ({_first_line(e)}); fix its settings or drop --tracker {name}"
        ) from None


@contextlib.contextmanager
def open_run_log(
    folder: RunFolder, names: Sequence[str] | None, configs: Configs, resume_step: int | None
) -> Iterator[RunLog]:
    """The session's RunLog (main process only): opens the trackers `names` (None: on resume, those the
    run used last; else none), saves how to reopen their runs in `RUN/trackers.json`, and closes them with
    the session's outcome. `resume_step` is the checkpoint's step on resume, else None."""
    saved = _read_saved(folder) if resume_step is not None else {}
    runs: dict[str, Any] = dict(saved.get("runs", {}))
    if names is None:
        names = tuple(n for n in saved.get("trackers", []) if n in TRACKERS)
    trackers: list[Tracker] = []
    try:
        for name in names:
            trackers.append(_open(name, folder, configs, runs.get(name), resume_step))
    except BaseException:
        RunLog(folder.log, trackers).close("failed")
        raise
    log = RunLog(folder.log, trackers)
    if trackers or saved:
        runs.update({t.name: t.saved for t in trackers})
        record = {"trackers": [t.name for t in trackers], "runs": runs}
        folder.trackers.write_text(json.dumps(record, indent=2) + "\n")
    try:
        yield log
    except KeyboardInterrupt:
        log.close("interrupted")
        raise
    except BaseException:
        log.close("failed")
        raise
    log.close("finished")
