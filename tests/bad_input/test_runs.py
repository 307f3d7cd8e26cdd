"""The bad-input catalogue of the folders commands write and the runs they hold: `train`, `distill`,
`demo`, `import`, `export`, `info`, and the faults a run meets (two resumes at once, Ctrl-C, a full disk).

Each refusal is checked by tests/bad_input/__init__.py: exit 2, one stderr line naming the problem and the fix, no
traceback, every file the command was pointed at byte-identical afterwards. The rule they share is
`nanogpt.folders.claim`: a command replaces only a folder nanogpt wrote for the same purpose.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nanogpt import cli
from nanogpt.config import ModelConfig, TrainConfig
from nanogpt.folders import LOCK, MARKER, folder_purpose
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import load_model, save_model
from nanogpt.train.loop import train
from nanogpt.train.optim import schedule_warning
from nanogpt.train.plot import read_log
from tests.bad_input import mount_tmpfs, refuse, refuse_subprocess, run_nanogpt
from tests.bad_input import small_disk as disk
from tests.processes import default_sigint, kill_when, wait_for
from tests.tiny import TINY_MODEL

MODEL = {**TINY_MODEL, "context_length": 32}
QUICK = [
    "--batch-size", "2", "--eval-iters", "1", "--log-interval", "1", "--warmup-iters", "1",
    "--learning-rate", "1e-3", "--threads", "1", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "model.json"
    p.write_text(json.dumps(MODEL))
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data) -> Path:
    """A finished 4-step run with checkpoints (last/, best/): what a user must never lose."""
    run = tmp_path_factory.mktemp("runs") / "trained"
    cfg = TrainConfig(batch_size=2, max_iters=4, eval_interval=2, eval_iters=1, warmup_iters=1, device="cpu")
    train(ModelConfig(**MODEL), cfg, small_data, run, progress=False)
    return run


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """A folder of the user's own files."""
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("three weeks of notes\n")
    (d / "sub").mkdir()
    (d / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return d


@pytest.fixture
def user_file(tmp_path) -> Path:
    f = tmp_path / "thesis.txt"
    f.write_text("do not lose me\n")
    return f


@pytest.fixture
def copy_of(tmp_path, trained) -> Path:
    """A private copy of the trained run, for cases that break it."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def train_argv(data: Path, out: Path, config: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--config", str(config), *QUICK, *extra]


# --- train: the folder rule --------------------------------------------------------------------------------


def test_train_out_is_a_user_folder(capsys, small_data, config, user_folder):
    refuse(
        capsys,
        train_argv(small_data, user_folder, config, "--max-iters", "2"),
        names="did not write",
        fix="--force",
        untouched=[user_folder],
    )


def test_train_out_is_a_file(capsys, small_data, config, user_file):
    refuse(
        capsys,
        train_argv(small_data, user_file, config, "--max-iters", "2"),
        names="is a file",
        fix="--force",
        untouched=[user_file],
    )


def test_train_out_holds_a_run_with_checkpoints(capsys, small_data, config, copy_of):
    refuse(
        capsys,
        train_argv(small_data, copy_of, config, "--max-iters", "2"),
        names="already holds a training run",
        fix="--resume",
        untouched=[copy_of],
    )


def test_train_force_replaces_a_user_folder_and_marks_it(capsys, small_data, config, user_folder):
    assert cli.main(train_argv(small_data, user_folder, config, "--max-iters", "2", "--force")) == 0
    assert not (user_folder / "notes.txt").exists() and folder_purpose(user_folder) == "run"


def test_train_failure_before_any_write_leaves_nothing(capsys, tmp_path, config):
    out = tmp_path / "new_run"
    refuse(
        capsys,
        train_argv(tmp_path / "no_data", out, config, "--max-iters", "2"),
        names="not found",
        fix="nanogpt prepare",
    )
    assert not out.exists()


def test_train_run_without_checkpoint_restarts_by_the_same_command(capsys, small_data, config, tmp_path):
    """A run that stopped before its first checkpoint (its folder holds only what train writes at the start)."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / MARKER).write_text(json.dumps({"kind": "run"}))
    ModelConfig(**MODEL).save(stub / "config.json")
    (stub / "log.jsonl").write_text(json.dumps({"step": 0, "val_loss": 10.9}) + "\n")
    refuse(
        capsys,
        train_argv(small_data, stub, config, "--max-iters", "2", "--resume"),
        names="no checkpoint yet",
        fix="without --resume",
        untouched=[stub],
    )
    assert cli.main(train_argv(small_data, stub, config, "--max-iters", "2")) == 0
    assert (stub / "last" / "state.json").is_file()


def test_train_out_holding_files_named_like_ours_is_the_users(capsys, small_data, config, tmp_path):
    """A file's name is no proof: `train_config.json` beside the user's notes does not make a run folder."""
    ud = tmp_path / "ud"
    ud.mkdir()
    (ud / "train_config.json").write_text("{}")
    (ud / "notes.txt").write_text("precious\n")
    refuse(
        capsys,
        train_argv(small_data, ud, config, "--max-iters", "1"),
        names="did not write",
        fix="--force",
        untouched=[ud],
    )


def test_train_out_a_run_stub_with_the_users_note(capsys, small_data, config, tmp_path):
    """A run stopped before its first checkpoint restarts by the same command, unless the user added a file."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / MARKER).write_text(json.dumps({"kind": "run"}))
    ModelConfig(**MODEL).save(stub / "config.json")
    (stub / "notes.txt").write_text("why this run\n")
    line = refuse(
        capsys,
        train_argv(small_data, stub, config, "--max-iters", "2"),
        names=["did not write", "notes.txt"],
        fix="--force",
        untouched=[stub],
    )
    assert "move them out" in line


def test_train_resume_before_the_first_checkpoint_without_data(capsys, tmp_path):
    """--resume takes the run's data by default: a run with nothing to resume says so, not "--data is required"."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / MARKER).write_text(json.dumps({"kind": "run"}))
    ModelConfig(**MODEL).save(stub / "config.json")
    refuse(
        capsys,
        ["train", "--out", str(stub), "--resume", "--no-progress"],
        names="no checkpoint yet",
        fix="without --resume",
        untouched=[stub],
    )


def test_train_out_on_a_read_only_file_system(capsys, small_data, config, tmp_path, monkeypatch):
    where = tmp_path / "ro"
    where.mkdir()
    mounted = mount_tmpfs(where, "ro,size=1m")
    if not mounted:  # no read-only mount here: the same OSError from the first write into --out
        import errno

        from nanogpt.folders import RunLock

        def read_only(self):
            raise OSError(errno.EROFS, "Read-only file system", str(self.path))

        monkeypatch.setattr(RunLock, "acquire", read_only)
    try:
        line = refuse(
            capsys,
            train_argv(small_data, where / "run", config, "--max-iters", "1"),
            names=["could not write", "read-only"],
            fix="writable",
        )
        assert "free space" not in line
    finally:
        if mounted:
            subprocess.run(["umount", str(where)], capture_output=True, timeout=10)


# --- train: flags and configs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, names, fix",
    [
        (["--learning-rate", "-1e-3"], "learning_rate=-0.001", "--learning-rate"),
        (["--learning-rate=-1e-3"], "learning_rate=-0.001", "--learning-rate"),
        (["--learning-rate", "nan"], "finite", "--learning-rate"),
        (["--learning-rate", "inf"], "finite", "--learning-rate"),
        (["--learning-rate"], "expected one argument", "--help"),
        (["--learning-rate", "fast"], "invalid float", "--help"),
        (["--threads=-3"], "--threads -3", "omit it"),
        (["--threads", "0"], "--threads 0", "omit it"),
        (["--max-iters", "-5"], "max_iters=-5", "--max-iters"),
        (["--max-iters", "2.5"], "not a whole number", "--help"),
        (["--batch-size", "0"], "batch_size=0", "--batch-size"),
        (["--beta2", "1.5"], "beta2=1.5", "--beta2"),
        (["--grad-clip", "-1"], "grad_clip=-1", "--grad-clip"),
        (["--dtype", "fp8"], "fp8", "fp32"),
        (["--device", "tpu"], "unknown device", "cpu"),
        (["--distill-alpha", "2"], "distill_alpha=2", "--distill-alpha"),
        (["--preset", "huge"], "invalid choice", "--help"),
        (["--frobnicate"], "unrecognized arguments", "--help"),
    ],
)
def test_train_bad_flag(capsys, small_data, config, tmp_path, flags, names, fix):
    out = tmp_path / "r"
    refuse(capsys, train_argv(small_data, out, config, "--max-iters", "2", *flags), names=names, fix=fix)
    assert not out.exists()


@pytest.mark.parametrize(
    "text, names",
    [
        ('{"d_model": "big"}', "d_model='big'"),
        ('{"d_model": 1e400}', "d_model=inf"),
        ('{"d_model": 64.0, "n_heads": 4}', "whole number"),
        ('{"n_layers": true}', "n_layers=True"),
        ('{"dropout": 1.5}', "dropout=1.5"),
        ('{"ln_eps": -1}', "ln_eps=-1"),
        ('{"learning_rate": "3e-4"}', "learning_rate='3e-4'"),
        ('{"dmodel": 64}', "unknown key 'dmodel'"),
        ("[384, 8]", "JSON object"),
        ("{d_model: 384", "not valid JSON"),
    ],
)
def test_train_bad_config_file(capsys, small_data, tmp_path, text, names):
    cfg = tmp_path / "bad.json"
    cfg.write_text(text)
    refuse(
        capsys,
        train_argv(small_data, tmp_path / "r", cfg, "--max-iters", "2"),
        names=names,
        fix="config",
        untouched=[cfg],
    )


def test_train_resume_corrupt_state_json_without_data(capsys, copy_of):
    (copy_of / "last" / "state.json").write_text('{"step": 4, "data_d')
    refuse(
        capsys,
        ["train", "--out", str(copy_of), "--resume", "--no-progress"],
        names=["state.json", "not valid JSON"],
        fix="regenerate",
        untouched=[copy_of],
    )


def test_train_resume_state_json_missing_keys(capsys, small_data, copy_of):
    (copy_of / "last" / "state.json").write_text('{"optimizer": {"param_groups": []}}')
    refuse(
        capsys,
        ["train", "--out", str(copy_of), "--data", str(small_data), "--resume", "--no-progress"],
        names="optimizer state",
        fix="another checkpoint",
        untouched=[copy_of],
    )


def test_train_resume_nothing_there(capsys, small_data, tmp_path):
    refuse(
        capsys,
        ["train", "--out", str(tmp_path / "none"), "--data", str(small_data), "--resume", "--preset", "tiny"],
        names="nothing to resume",
        fix="drop --resume",
    )


def test_train_resume_with_another_model_config(capsys, small_data, copy_of, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**MODEL, "n_layers": 3}))
    refuse(
        capsys,
        train_argv(small_data, copy_of, other, "--resume", "--max-iters", "8"),
        names="'n_layers'",
        fix="run's config",
        untouched=[copy_of],
    )


def test_train_resume_prints_the_step(capsys, small_data, config, copy_of):
    assert cli.main(train_argv(small_data, copy_of, config, "--resume", "--max-iters", "6")) == 0
    assert f"resumed {copy_of} at step 4 of 6" in capsys.readouterr().out
    assert cli.main(["train", "--out", str(copy_of), "--resume", "--max-iters", "8", "--no-progress"]) == 0
    assert f"resumed {copy_of} at step 6 of 8" in capsys.readouterr().out


def test_train_warmup_covering_most_of_the_run_warns_in_one_line(capsys, small_data, config, tmp_path):
    assert schedule_warning(TrainConfig(max_iters=30)) is not None  # the card's 500 warmup iterations
    assert schedule_warning(TrainConfig(max_iters=20000)) is None
    argv = ["train", "--data", str(small_data), "--out", str(tmp_path / "w"), "--config", str(config)]
    argv += ["--batch-size", "2", "--eval-iters", "1", "--max-iters", "3", "--no-progress"]
    assert cli.main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "warmup_iters=500" in warnings[0] and "--warmup-iters" in warnings[0]


# --- import / export / demo / distill / info: the folder rule -------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained) -> Path:
    out = tmp_path_factory.mktemp("hf") / "export"
    assert cli.main(["export", "--model", str(trained), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("target", ["user_folder", "user_file", "trained_run", "an_export"])
def test_import_out_not_an_earlier_import(capsys, request, exported, copy_of, target):
    out = {
        "user_folder": lambda: request.getfixturevalue("user_folder"),
        "user_file": lambda: request.getfixturevalue("user_file"),
        "trained_run": lambda: copy_of,
        "an_export": lambda: Path(shutil.copytree(exported, copy_of.parent / "exp")),
    }[target]()
    refuse(
        capsys,
        ["import", "--hf", str(exported), "--out", str(out)],
        names=str(out),
        fix="--force",
        untouched=[out, exported],
    )


def test_import_replaces_an_earlier_import_and_force_replaces_a_user_folder(exported, user_folder, tmp_path):
    out = tmp_path / "ckpt"
    for _ in range(2):  # the second replaces the first without --force
        assert cli.main(["import", "--hf", str(exported), "--out", str(out)]) == 0
    assert folder_purpose(out) == "checkpoint" and load_model(out).config.d_model == 32
    assert cli.main(["import", "--hf", str(exported), "--out", str(user_folder), "--force"]) == 0
    assert not (user_folder / "notes.txt").exists() and folder_purpose(user_folder) == "checkpoint"


@pytest.mark.parametrize("target", ["user_folder", "user_file", "trained_run"])
def test_export_out_not_an_earlier_export(capsys, request, trained, copy_of, target):
    out = copy_of if target == "trained_run" else request.getfixturevalue(target)
    refuse(
        capsys,
        ["export", "--model", str(trained), "--out", str(out)],
        names=str(out),
        fix="--force",
        untouched=[out, trained],
    )


@pytest.mark.parametrize("target", ["user_folder", "trained_run"])
def test_demo_out_not_an_earlier_demo(capsys, request, copy_of, tmp_path, target):
    out = copy_of if target == "trained_run" else request.getfixturevalue(target)
    data = tmp_path / "demo_data"
    refuse(
        capsys,
        ["demo", "--out", str(out), "--data", str(data), "--minutes", "0.1"],
        names=str(out),
        fix="--force",
        untouched=[out],
    )
    assert not data.exists()  # refused before any work


def user_adds(folder: Path) -> Path:
    """What a user puts into a folder nanogpt wrote: a note and a folder of results."""
    (folder / "my_notes.txt").write_text("findings\n")
    (folder / "eval").mkdir()
    (folder / "eval" / "scores.csv").write_text("ppl\n42\n")
    return folder


@pytest.mark.parametrize("fmt", ["gpt2", "remote-code"])
def test_export_into_an_earlier_export_with_the_users_files(capsys, trained, exported, tmp_path, fmt):
    out = user_adds(Path(shutil.copytree(exported, tmp_path / "exp")))
    refuse(
        capsys,
        ["export", "--model", str(trained), "--out", str(out), "--format", fmt],
        names=["did not write", "eval", "my_notes.txt"],
        fix="--force",
        untouched=[out, trained],
    )


def test_export_replaces_an_earlier_export_of_its_own_files(trained, exported, tmp_path):
    out = Path(shutil.copytree(exported, tmp_path / "exp"))
    assert cli.main(["export", "--model", str(trained), "--out", str(out), "--format", "gpt2"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    marker = json.loads((out / MARKER).read_text())
    assert sorted(marker["files"]) == sorted(p.name for p in out.iterdir() if p.name != MARKER)


def test_export_of_an_older_version_without_a_list(capsys, trained, exported, tmp_path):
    """A marker without `files` (an older nanogpt): the export's own files are replaced, nothing else."""
    old = Path(shutil.copytree(exported, tmp_path / "old"))
    (old / MARKER).write_text(json.dumps({"kind": "export"}))
    assert cli.main(["export", "--model", str(trained), "--out", str(old), "--format", "gpt2"]) == 0
    (old / MARKER).write_text(json.dumps({"kind": "export"}))
    user_adds(old)
    refuse(
        capsys,
        ["export", "--model", str(trained), "--out", str(old)],
        names=["did not write", "my_notes.txt"],
        fix="--force",
        untouched=[old],
    )


def test_import_into_an_earlier_import_with_the_users_files(capsys, exported, tmp_path):
    out = tmp_path / "ckpt"
    assert cli.main(["import", "--hf", str(exported), "--out", str(out)]) == 0
    user_adds(out)
    refuse(
        capsys,
        ["import", "--hf", str(exported), "--out", str(out)],
        names=["did not write", "eval", "my_notes.txt"],
        fix="--force",
        untouched=[out, exported],
    )


@pytest.fixture
def earlier_demo(tmp_path, small_data, trained) -> Path:
    """A demo folder as `nanogpt demo` leaves it: its run (kind "demo"), its hf/ export and demo.json."""
    out = tmp_path / "demo"
    cfg = TrainConfig(batch_size=2, max_iters=2, eval_interval=2, eval_iters=1, warmup_iters=1, device="cpu")
    train(ModelConfig(**MODEL), cfg, small_data, out, progress=False, purpose="demo")
    assert cli.main(["export", "--model", str(out), "--out", str(out / "hf")]) == 0
    (out / "demo.json").write_text("{}\n")
    return out


@pytest.mark.parametrize("where", [".", "hf"])
def test_demo_into_an_earlier_demo_with_the_users_files(capsys, earlier_demo, tmp_path, where):
    (earlier_demo / where / "notes.txt").write_text("keep\n")
    data = tmp_path / "demo_data"
    name = "notes.txt" if where == "." else "hf/notes.txt"
    refuse(
        capsys,
        ["demo", "--out", str(earlier_demo), "--data", str(data), "--minutes", "0.1"],
        names=["did not write", name],
        fix="--force",
        untouched=[earlier_demo],
    )
    assert not data.exists()  # refused before any work


def test_demo_minutes_not_positive(capsys, tmp_path):
    refuse(
        capsys, ["demo", "--out", str(tmp_path / "d"), "--minutes", "-1"], names="--minutes", fix="positive"
    )


@pytest.mark.parametrize("target", ["user_folder", "student_run"])
def test_distill_out_not_a_fresh_run(capsys, request, small_data, trained, copy_of, target):
    out = copy_of if target == "student_run" else request.getfixturevalue(target)
    argv = ["distill", "--student", str(trained), "--teacher", str(trained), "--data", str(small_data)]
    refuse(
        capsys,
        [*argv, "--out", str(out), "--max-iters", "2", "--no-progress"],
        names=str(out),
        fix="--force" if target == "user_folder" else "--resume",
        untouched=[out, trained],
    )
    assert not out.with_name(out.name + ".teacher").exists()


def test_prepare_out_is_a_user_folder(capsys, user_folder, tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("A line of text.\n" * 400)
    refuse(
        capsys,
        ["prepare", "--source", str(src), "--out", str(user_folder), "--quiet"],
        names="did not write",
        fix="--force",
        untouched=[user_folder, src],
    )


def test_prepare_out_is_a_user_folder_holding_a_meta_json(capsys, user_folder, tmp_path):
    """A user's `meta.json` does not make a prepared-data folder: not "prepared with other settings"."""
    src = tmp_path / "corpus.txt"
    src.write_text("A line of text.\n" * 400)
    (user_folder / "meta.json").write_text('{"source": {"settings": {"seed": 7}}}')
    line = refuse(
        capsys,
        ["prepare", "--source", str(src), "--out", str(user_folder), "--quiet"],
        names="did not write",
        fix="--force",
        untouched=[user_folder, src],
    )
    assert "other settings" not in line


@pytest.mark.parametrize(
    "text, names, fix",
    [
        ("[1, 2]", "JSON object", "regenerate"),
        ("not json", "not valid JSON", "regenerate"),
        ('{"n_heads": 5}', "not divisible", "pick n_heads"),
    ],
)
def test_info_bad_config(capsys, tmp_path, text, names, fix):
    cfg = tmp_path / "c.json"
    cfg.write_text(text)
    refuse(capsys, ["info", "--config", str(cfg)], names=names, fix=fix, untouched=[cfg])


# --- faults: two resumes at once, Ctrl-C, a full disk, distill's own log ----------------------------------


def _start_train(data: Path, run: Path, config: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nanogpt", *train_argv(data, run, config, *extra)]
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )


def test_train_two_resumes_at_once(small_data, config, copy_of):
    """The second resume is refused naming the first one's PID; a SIGKILL leaves no stale lock behind."""
    first = _start_train(
        small_data, copy_of, config, "--resume", "--max-iters", "100000", "--eval-interval", "5"
    )
    try:
        wait_for(
            lambda: (copy_of / LOCK).is_file() and (copy_of / LOCK).read_text().strip() == str(first.pid),
            first,
        )
        log_before = (copy_of / "log.jsonl").read_bytes()
        line = refuse_subprocess(
            ["train", "--out", str(copy_of), "--resume", "--no-progress", "--max-iters", "100000"],
            names=f"PID {first.pid}",
            fix="wait for it",
        )
        assert "another nanogpt process" in line
        assert (copy_of / "log.jsonl").read_bytes().startswith(log_before)  # the second wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    steps = [r["step"] for r in read_log(copy_of / "log.jsonl") if "loss" in r]
    assert len(steps) == len(set(steps))  # no interleaved duplicate steps
    r = run_nanogpt(["train", "--out", str(copy_of), "--resume", "--no-progress", "--max-iters", "1"])
    assert r.returncode == 0, r.stderr  # the kernel dropped the killed process's lock


def test_train_ctrl_c_says_how_to_continue(small_data, config, tmp_path):
    run = tmp_path / "r"
    proc = _start_train(small_data, run, config, "--max-iters", "100000", "--eval-interval", "3")
    try:
        wait_for(lambda: (run / "last" / "state.json").is_file(), proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert (
        err.splitlines()[-1].startswith("nanogpt train: interrupted;") and "--resume" in err.splitlines()[-1]
    )
    assert "Traceback" not in err
    r = run_nanogpt(["train", "--out", str(run), "--resume", "--no-progress", "--max-iters", "1"])
    assert r.returncode == 0 and "resumed" in r.stdout


def test_train_ctrl_c_before_the_first_checkpoint_says_start_over(small_data, config, tmp_path):
    run = tmp_path / "r"
    proc = _start_train(small_data, run, config, "--max-iters", "100000", "--eval-interval", "100000")
    try:
        wait_for(lambda: (run / "log.jsonl").is_file(), proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "run the same command again" in err.splitlines()[-1]
    r = run_nanogpt(train_argv(small_data, run, config, "--max-iters", "1"))
    assert r.returncode == 0, r.stderr  # the stub is replaced by the same command


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path | None]:
    """36 MiB: room for the test model's first best/ (6.4 MB) and last/ (19.3 MB), not for a second last/."""
    with disk(tmp_path / "disk", "36m") as where:
        yield where


def test_train_disk_full_at_a_checkpoint_keeps_last(
    capsys, small_data, config, tmp_path, small_disk, monkeypatch
):
    if small_disk is None:  # no small filesystem here: the same OSError from the write itself
        import nanogpt.train.checkpoint as ckpt

        calls = {"n": 0}
        real = ckpt.save_file

        def fail_fourth(*a, **kw):
            calls["n"] += 1
            if calls["n"] >= 4:  # best/ and last/ (two files) of the first checkpoint succeed
                raise OSError(28, "No space left on device")
            return real(*a, **kw)

        monkeypatch.setattr(ckpt, "save_file", fail_fourth)
    run = (small_disk or tmp_path) / "r"
    argv = train_argv(small_data, run, config, "--max-iters", "8", "--eval-interval", "2")
    refuse(capsys, argv, names=["could not write", "unchanged"], fix="free space")
    assert not (run / "last.tmp").exists()
    state = json.loads((run / "last" / "state.json").read_text())
    assert state["step"] >= 2 and load_model(run / "last").config.d_model == 32
    if small_disk is not None:  # with room again, the run continues from the intact last/
        subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True, timeout=10)
        assert cli.main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
        assert json.loads((run / "last" / "state.json").read_text())["step"] == 8


def test_distill_log_is_trimmed_on_resume(small_data, tmp_path, trained):
    """Killed (SIGKILL, from outside) with steps logged past its checkpoint: the resumed run writes those
    steps again, once each."""
    out = tmp_path / "kd"
    argv = ["distill", "--student", str(trained), "--teacher", str(trained), "--data", str(small_data)]
    argv += ["--out", str(out), "--batch-size", "2", "--eval-iters", "1", "--eval-interval", "2"]
    argv += ["--max-iters", "1000000", "--warmup-iters", "1", "--threads", "1", "--no-progress"]
    log = out.with_name("kd.teacher") / "distill_log.jsonl"

    def checkpoint_step() -> int | None:
        try:
            return json.loads((out / "last" / "state.json").read_text())["step"]
        except (OSError, ValueError):
            return None

    def past_checkpoint() -> bool:
        saved = checkpoint_step()
        return saved is not None and max((r["step"] for r in read_log(log)), default=0) > saved

    proc = subprocess.Popen(
        [sys.executable, "-m", "nanogpt", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        kill_when(past_checkpoint, proc)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved, steps = checkpoint_step(), [rec["step"] for rec in read_log(log)]
    assert saved is not None and steps == list(range(1, steps[-1] + 1)) and steps[-1] > saved
    resume = ["distill", "--out", str(out), "--resume", "--max-iters", str(saved + 3)]
    r = run_nanogpt([*resume, "--threads", "1", "--no-progress"])  # teacher, data and settings: the run's
    assert r.returncode == 0, r.stderr
    assert [rec["step"] for rec in read_log(log)] == list(range(1, saved + 4))


def test_import_out_is_a_checkpoint_saved_by_the_library(capsys, exported, tmp_path):
    """A checkpoint folder the user saved from Python (no marker) is theirs: import refuses to replace it."""
    mine = tmp_path / "my_ckpt"
    save_model(mine, NanoGPTLMHeadModel(ModelConfig(**MODEL)))
    refuse(
        capsys,
        ["import", "--hf", str(exported), "--out", str(mine)],
        names="did not write",
        fix="--force",
        untouched=[mine],
    )


def test_init_from_a_checkpoint_of_another_architecture_is_refused(small_data, tmp_path, capsys):
    """Weights of the same shapes would load into a network with another activation unnoticed: the model
    config given (a --config file, or the Python API's) must be the checkpoint's, dropout aside."""
    from dataclasses import replace

    from tests.tiny import quick_train_config, tiny_config

    base = save_model(tmp_path / "base", NanoGPTLMHeadModel(tiny_config()))
    config = tmp_path / "model.json"
    config.write_text(json.dumps({**tiny_config().to_dict(), "activation": "gelu_tanh"}))
    out = tmp_path / "run"
    argv = ["train", "--data", str(small_data), "--out", str(out), "--init-from", str(base)]
    refuse(
        capsys,
        [*argv, "--config", str(config), "--max-iters", "1", "--no-progress"],
        names=["'activation'", "gelu_tanh", str(base)],
        fix="its own config",
        untouched=[base],
    )
    with pytest.raises(Exception, match="differs from --init-from"):
        train(replace(tiny_config(), ln_eps=1e-6), quick_train_config(), small_data, out, init_from=str(base))
