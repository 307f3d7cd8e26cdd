"""The files nanogpt writes get the user's umask, like any program's: a run, its checkpoints, every export
format and an import, written under umask 022 (files 0644, folders 0755: shareable) and 077 (0600 / 0700:
private). safetensors creates its files 0600 whatever the umask, so `model.safetensors` used to be the one
file another account could not read in an exported folder.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from nanogpt import cli
from tests.tiny import TINY_MODEL

QUICK = [
    "--batch-size", "2", "--eval-iters", "1", "--warmup-iters", "1", "--max-iters", "2",
    "--eval-interval", "2", "--device", "cpu", "--threads", "1", "--no-progress",
]  # fmt: skip


@pytest.fixture
def umask(request) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (itself included) -> its permission bits in octal."""
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths}


@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True, ids=["022", "077"])
def test_written_files_follow_the_umask(umask, small_data, tmp_path, capsys):
    pytest.importorskip("tokenizers")
    pytest.importorskip("gguf")
    (tmp_path / "model.json").write_text(json.dumps(TINY_MODEL))
    run = tmp_path / "run"
    commands = [
        [
            "train",
            "--data",
            str(small_data),
            "--out",
            str(run),
            "--config",
            str(tmp_path / "model.json"),
            *QUICK,
        ],
        ["export", "--model", str(run), "--out", str(tmp_path / "remote")],
        ["export", "--model", str(run), "--out", str(tmp_path / "gpt2"), "--format", "gpt2"],
        ["export", "--model", str(run), "--out", str(tmp_path / "gguf"), "--format", "gguf"],
        ["export", "--model", str(run), "--out", str(tmp_path / "one.gguf"), "--format", "gguf"],
        ["import", "--hf", str(tmp_path / "gpt2"), "--out", str(tmp_path / "imported")],
    ]
    for argv in commands:
        assert cli.main(argv) == 0, (argv, capsys.readouterr().err)
    written = {}
    for name in ("run", "remote", "gpt2", "gguf", "one.gguf", "imported"):
        written |= modes(tmp_path / name)
    assert {"run/last/model.safetensors", "run/best/model.safetensors", "run/last/state.safetensors",
            "gpt2/model.safetensors", "remote/model.safetensors", "imported/model.safetensors",
            "gguf/model.gguf", "one.gguf"} <= set(written)  # fmt: skip
    file_mode, dir_mode = oct(0o666 & ~umask), oct(0o777 & ~umask)
    wrong = {p: m for p, m in written.items() if m != (dir_mode if (tmp_path / p).is_dir() else file_mode)}
    assert not wrong, f"umask {umask:03o}: expected files {file_mode}, folders {dir_mode}; got {wrong}"
