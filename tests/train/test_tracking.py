"""Experiment trackers: TensorBoard, W&B and MLflow hold the scalars of log.jsonl, through Ctrl-C and --resume.

Everything stays on this machine: W&B runs offline (`WANDB_MODE=offline`, its files read back from disk),
MLflow writes a `file:` store in tmp (read back through `MlflowClient`), TensorBoard's event files are read
with its own `EventAccumulator`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from nanogpt.errors import UserError
from nanogpt.train.plot import read_log
from nanogpt.train.tracking import RunLog, check_installed, parse_trackers
from tests.bad_input import run_nanogpt
from tests.processes import default_sigint, wait_for
from tests.tiny import TINY_MODEL

QUICK = [
    "--batch-size", "2", "--eval-iters", "1", "--log-interval", "1", "--warmup-iters", "1",
    "--learning-rate", "1e-3", "--device", "cpu", "--threads", "1", "--no-progress",
]  # fmt: skip

# ---- the flag and the log (default suite) ------------------------------------------------------------


def test_tracker_flag_takes_repeats_and_comma_lists():
    assert parse_trackers(None) is None  # unset: the run's own on --resume
    assert parse_trackers(["tensorboard,wandb", "mlflow", "wandb"]) == ("tensorboard", "wandb", "mlflow")
    assert parse_trackers([" TensorBoard , "]) == ("tensorboard",)
    assert parse_trackers(["none"]) == ()
    with pytest.raises(UserError, match=r"unknown tracker 'comet'; use tensorboard, wandb, mlflow or none"):
        parse_trackers(["tensorboard,comet"])


def test_a_tracker_that_is_not_installed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # how Python marks a module that cannot be imported
    with pytest.raises(UserError) as e:
        check_installed(parse_trackers(["mlflow"]))
    assert str(e.value).startswith("--tracker mlflow needs the mlflow-skinny package; install with")
    assert 'pip install -e ".[track]"' in str(e.value) and "\n" not in str(e.value)


def test_mlflow_default_store_needs_sqlalchemy_and_says_so(monkeypatch):
    """MLflow 3 keeps runs in SQLite (./mlflow.db) when MLFLOW_TRACKING_URI is unset; mlflow-skinny opens it
    only beside sqlalchemy (and alembic). Without them: one line naming the packages and the extra, before
    any work, instead of MLflow's model-registry error after the run folder is written."""
    pytest.importorskip("mlflow")
    for k in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(k)
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # how Python marks a module that cannot be imported
    with pytest.raises(UserError) as e:
        check_installed(("mlflow",))
    msg = str(e.value)
    assert msg.startswith(
        "--tracker mlflow keeps runs in its default store, SQLite in ./mlflow.db, which needs"
    )
    assert "sqlalchemy" in msg and 'pip install -e ".[track]"' in msg and "\n" not in msg
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # a server: nothing to open here
    check_installed(("mlflow",))


def test_the_track_extra_installs_what_mlflows_default_store_needs():
    """`pip install -e ".[track]"` (the README's line) gives mlflow-skinny its SQLite store: sqlalchemy and
    alembic are in the extra, and in the ecosystem extra that runs the real-tracker tests."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    for extra in ("track", "ecosystem"):
        names = {
            re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower()
            for req in extras["optional-dependencies"][extra]
        }
        assert {"mlflow-skinny", "sqlalchemy", "alembic"} <= names, extra


class _Recorder:
    """A tracker that keeps what it is given (or fails at `fail_at`), to check RunLog's own rules."""

    def __init__(self, name: str, fail_at: int | None = None) -> None:
        self.name, self.fail_at, self.saved = name, fail_at, {}
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.closed: str | None = None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step == self.fail_at:
            raise ConnectionError("dashboard unreachable\nsecond line")
        self.logged.append((step, scalars))

    def close(self, status: str) -> None:
        self.closed = status


def test_run_log_writes_the_line_then_the_numbers_and_drops_a_failing_tracker(tmp_path, capsys):
    ok, flaky = _Recorder("tensorboard"), _Recorder("mlflow", fail_at=2)
    log = RunLog(tmp_path / "log.jsonl", [ok, flaky])
    records = [
        {"step": 0, "tokens": 0, "val_loss": 10.5},
        {"step": 1, "loss": 10.0, "grad_norm": None, "lr": 1e-3},
        {"step": 2, "loss": 9.0, "grad_norm": 1.5},
        {"step": 3, "loss": 8.0},
    ]
    for r in records:
        log.append(r)
    log.close("finished")
    assert read_log(tmp_path / "log.jsonl") == records  # the file is whole whatever the trackers do
    assert ok.logged == [
        (0, {"tokens": 0.0, "val_loss": 10.5}),
        (1, {"loss": 10.0, "lr": 1e-3}),  # no number, no scalar: a missing grad norm is skipped
        (2, {"loss": 9.0, "grad_norm": 1.5}),
        (3, {"loss": 8.0}),
    ]
    assert [s for s, _ in flaky.logged] == [0, 1]  # dropped at its failure, never called again
    assert ok.closed == "finished" and flaky.closed is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: --tracker mlflow stopped logging (dashboard unreachable)"]


# ---- the real tools (ecosystem) -------------------------------------------------------------------------


def scalars_of_log(run: Path) -> dict[str, dict[int, float]]:
    """log.jsonl as {key: {step: value}}: what every tracker must hold."""
    out: dict[str, dict[int, float]] = {}
    for r in read_log(run / "log.jsonl"):
        for k, v in r.items():
            if k != "step" and isinstance(v, int | float):
                out.setdefault(k, {})[r["step"]] = float(v)
    return out


def tensorboard_scalars(folder: Path) -> tuple[dict[str, dict[int, float]], Any]:
    """The scalars TensorBoard shows for `folder` (purged steps dropped, as its UI drops them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    for tag in acc.Tags()["scalars"]:  # one event per step: a purge left no duplicate behind
        assert len(acc.Scalars(tag)) == len(scalars[tag]), tag
    return scalars, acc


def assert_same_scalars(
    got: dict[str, dict[int, float]], want: dict[str, dict[int, float]], rel: float
) -> None:
    assert sorted(got) == sorted(want)
    for key, series in want.items():
        assert sorted(got[key]) == sorted(series), key
        for step, v in series.items():
            assert got[key][step] == pytest.approx(v, rel=rel, abs=1e-12), (key, step)


def assert_up_to_last(
    got: dict[str, dict[int, float]], want: dict[str, dict[int, float]], last: int, rel: float
) -> None:
    """`got` holds every value of `want` before step `last`, and at `last` some of them, all equal."""
    before = {k: {s: v for s, v in series.items() if s < last} for k, series in want.items()}
    assert_same_scalars({k: {s: v for s, v in got.get(k, {}).items() if s < last} for k in want}, before, rel)
    assert set(got) <= set(want)
    for key, series in got.items():
        assert set(series) <= set(want[key]), key
        if last in series:
            assert series[last] == pytest.approx(want[key][last], rel=rel, abs=1e-12), key


def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B `.wandb` run file: LevelDB's log format (32 KiB blocks of checksum, length,
    type, data) after a 7-byte header, each record a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, chunk, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block trailer or zero fill
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(chunk)
            out.append(rec)
            chunk = b""
    return out


def wandb_session(path: Path) -> dict[str, Any]:
    """One offline W&B session: run id, config, history as {key: {step: value}}, exit code."""
    s: dict[str, Any] = {"history": {}, "exit": None, "config": {}}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            s["id"], s["name"] = rec.run.run_id, rec.run.display_name
            s["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "history":
            items = {(i.key or "/".join(i.nested_key)): i.value_json for i in rec.history.item}
            row = {k: json.loads(v) for k, v in items.items() if not k.startswith("_")}
            for k, v in row.items():
                if k != "step":
                    s["history"].setdefault(k, {})[row["step"]] = float(v)
        elif kind == "exit":
            s["exit"] = rec.exit.exit_code
    return s


def mlflow_scalars(client: Any, run_id: str, keys: list[str]) -> dict[str, dict[int, float]]:
    """Each metric's history, the last value written at each step winning (a resume writes some again)."""
    out = {}
    for k in keys:
        hist = sorted(
            client.get_metric_history(run_id, k), key=lambda m: m.timestamp
        )  # stable: ties keep order
        out[k] = {m.step: m.value for m in hist}
    return out


@pytest.fixture
def tracker_env(tmp_path, monkeypatch) -> dict[str, str]:
    """W&B offline and MLflow in a file store, both under tmp, here and in subprocesses: nothing leaves
    the machine."""
    (tmp_path / "wandb").mkdir()
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_SILENT": "true",
        "WANDB_PROJECT": "nanogpt-tests",
        "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}",
        "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 keeps the file store behind this switch
        "MLFLOW_EXPERIMENT_NAME": "nanogpt-tests",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def model_config(tmp_path) -> Path:
    p = tmp_path / "model.json"
    p.write_text(json.dumps(TINY_MODEL))
    return p


def past_a_checkpoint(run: Path) -> bool:
    """A checkpoint is written and the last logged step is the one after a checkpoint (eval interval 3)."""
    steps = [r["step"] for r in read_log(run / "log.jsonl")]
    return (run / "last" / "state.json").is_file() and len(steps) >= 6 and steps[-1] % 3 == 1


@pytest.mark.ecosystem
def test_trackers_hold_the_log_through_ctrl_c_and_resume_the_same_runs(
    small_data, model_config, tracker_env, tmp_path
):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    argv = ["train", "--data", str(small_data), "--out", str(run), "--config", str(model_config), *QUICK]
    # session 1: all three trackers, stopped by Ctrl-C as a terminal sends it (to the whole process group)
    trackers = ["--tracker", "tensorboard,wandb", "--tracker", "mlflow"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanogpt", *argv, "--max-iters", "100000", "--eval-interval", "3", *trackers],
        env={**os.environ, **tracker_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=default_sigint,
    )
    try:
        wait_for(lambda: past_a_checkpoint(run), proc, timeout=180)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "warning" not in err and "Traceback" not in err, err  # every tracker closed cleanly
    ckpt_step = json.loads((run / "last" / "state.json").read_text())["step"]
    first = scalars_of_log(run)
    stopped_at = max(first["loss"])
    assert stopped_at >= ckpt_step >= 3  # almost always >: steps past the checkpoint to replay

    saved = json.loads((run / "trackers.json").read_text())
    assert saved["trackers"] == ["tensorboard", "wandb", "mlflow"]
    client = MlflowClient(tracker_env["MLFLOW_TRACKING_URI"])
    run_id = saved["runs"]["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    # Ctrl-C lands anywhere, also between the log line and a tracker's copy of it: every step but the
    # last is whole in each tracker, the last one may be cut short (the resume below writes it again)
    assert_up_to_last(mlflow_scalars(client, run_id, list(first)), first, stopped_at, rel=0)
    assert_up_to_last(tensorboard_scalars(run / "tensorboard")[0], first, stopped_at, rel=1e-6)  # float32
    (w1,) = (Path(tracker_env["WANDB_DIR"]) / "wandb").glob("offline-run-*/run-*.wandb")
    s1 = wandb_session(w1)
    assert s1["id"] == saved["runs"]["wandb"]["id"] and s1["name"] == "run" and s1["exit"] == 130
    assert_up_to_last(s1["history"], first, stopped_at, rel=0)

    # session 2: --resume without --tracker continues the same three runs
    stop = stopped_at + 3
    r = run_nanogpt(
        ["train", "--out", str(run), "--resume", "--max-iters", str(stop), "--no-progress", "--threads", "1"],
        env=tracker_env,
    )
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr, r.stderr
    log = scalars_of_log(run)
    assert sorted(log["loss"]) == list(
        range(1, stop + 1)
    )  # the log was cut at the checkpoint, then continued
    assert json.loads((run / "trackers.json").read_text()) == saved  # same run ids

    tb, acc = tensorboard_scalars(run / "tensorboard")
    assert_same_scalars(tb, log, rel=1e-6)  # the steps past the checkpoint were purged, then written again
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one folder, two sessions
    text = acc.Tensors("config/model/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(textwrap.dedent(text)) == json.loads((run / "config.json").read_text())

    assert client.get_run(run_id).info.status == "FINISHED"
    assert mlflow_scalars(client, run_id, list(log)) == log
    params = client.get_run(run_id).data.params
    assert params["model.d_model"] == "32" and params["train.batch_size"] == "2"
    configs = json.loads(
        Path(client.get_run(run_id).info.artifact_uri.removeprefix("file:"), "configs.json").read_text()
    )
    assert configs["train"]["max_iters"] == stop  # this session's training config

    sessions = sorted((Path(tracker_env["WANDB_DIR"]) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(sessions) == 2
    s2 = wandb_session(sessions[1] if sessions[0] == w1 else sessions[0])
    assert s2["id"] == s1["id"] and s2["exit"] == 0  # `wandb sync` joins both sessions into one run
    assert s2["history"] == {
        k: {s: v for s, v in series.items() if s > ckpt_step}
        for k, series in log.items()
        if any(s > ckpt_step for s in series)
    }
    assert s2["config"]["model"] == json.loads((run / "config.json").read_text())
    assert s2["config"]["train"]["max_iters"] == stop


@pytest.mark.ecosystem
def test_mlflow_as_installed_with_no_mlflow_settings(small_data, model_config, tmp_path):
    """A README user: the `track` extra, no MLFLOW_* variable at all. The run lands in MLflow 3's default
    store (SQLite in ./mlflow.db of the folder nanogpt ran in, what `mlflow ui` there shows), whole."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    work, run = tmp_path / "work", tmp_path / "run"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    argv = ["train", "--data", str(small_data), "--out", str(run), "--config", str(model_config), *QUICK]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanogpt",
            *argv,
            "--max-iters",
            "4",
            "--eval-interval",
            "2",
            "--tracker",
            "mlflow",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr
    uri = f"sqlite:///{work / 'mlflow.db'}"
    saved = json.loads((run / "trackers.json").read_text())["runs"]["mlflow"]
    assert saved["tracking_uri"] == uri  # a --resume from another folder reopens this store
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("nanogpt").experiment_id])
    assert found.info.run_id == saved["run_id"] and found.info.run_name == "run"
    assert found.info.status == "FINISHED"
    log = scalars_of_log(run)
    assert sorted(log["loss"]) == [1, 2, 3, 4]
    assert mlflow_scalars(client, found.info.run_id, list(log)) == log
    assert found.data.params["model.d_model"] == "32"


@pytest.mark.ecosystem
def test_distill_logs_to_tensorboard(small_data, tmp_path):
    pytest.importorskip("tensorboard")
    import torch

    from nanogpt.commands.distill import main as distill_main
    from nanogpt.model.gpt import NanoGPTLMHeadModel
    from nanogpt.train.checkpoint import save_model
    from tests.tiny import tiny_config

    torch.manual_seed(0)
    teacher = save_model(tmp_path / "teacher", NanoGPTLMHeadModel(tiny_config()))
    student = save_model(tmp_path / "student", NanoGPTLMHeadModel(tiny_config()))
    run = tmp_path / "kd"
    models = ["--student", str(student), "--teacher", str(teacher)]
    steps = ["--max-iters", "4", "--eval-interval", "2"]
    out = ["--data", str(small_data), "--out", str(run)]
    assert distill_main([*models, *out, *steps, *QUICK, "--tracker", "tensorboard"]) == 0
    log = scalars_of_log(run)
    assert sorted(log["loss"]) == [1, 2, 3, 4]
    assert_same_scalars(tensorboard_scalars(run / "tensorboard")[0], log, rel=1e-6)


@pytest.mark.ecosystem
def test_mlx_training_logs_to_tensorboard(small_data, model_config, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlx.core")
    from nanogpt.commands.train import main as train_main

    run = tmp_path / "mlx"
    out = ["--data", str(small_data), "--out", str(run), "--config", str(model_config)]
    steps = ["--max-iters", "4", "--eval-interval", "2"]
    assert train_main(["--backend", "mlx", *out, *steps, *QUICK, "--tracker", "tensorboard"]) == 0
    log = scalars_of_log(run)
    assert sorted(log["loss"]) == [1, 2, 3, 4]
    assert_same_scalars(tensorboard_scalars(run / "tensorboard")[0], log, rel=1e-6)
