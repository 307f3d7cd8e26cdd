"""The check every catalogued bad input must pass (used by the catalogue modules beside it).

A refusal is: the documented exit code (2 unless said otherwise), exactly one line on stderr that names the
problem and the fix, no traceback, and every pre-existing file the command was pointed at byte-identical
afterwards. `refuse` runs the command in this process (fast; any exception other than a UserError escapes
cli.main and fails the test); `refuse_subprocess` runs it as a real `python -m nanogpt` process, for
signals, locks, ports and anything that must see a fresh interpreter.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from nanogpt import cli


def snapshot(paths: Iterable[str | Path]) -> dict[str, str]:
    """Path -> sha256 of every file under `paths` (folders walked), 'dir' for folders, 'absent' if missing."""
    out: dict[str, str] = {}
    for root in map(Path, paths):
        if not root.exists():
            out[str(root)] = "absent"
            continue
        todo = [root]
        while todo:
            p = todo.pop()
            if p.is_dir():
                out[str(p)] = "dir"
                todo.extend(p.iterdir())
            else:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _as_list(x: str | Iterable[str]) -> list[str]:
    return [x] if isinstance(x, str) else list(x)


def check_refusal(
    code: int, err: str, *, rc: int, names: str | Iterable[str], fix: str | Iterable[str]
) -> str:
    """Assert the exit code and that stderr is one line with every `names` and `fix` substring (case-insensitive)."""
    assert code == rc, f"exit code {code}, expected {rc}; stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}: {err!r}"
    line = lines[0].lower()
    for s in _as_list(names) + _as_list(fix):
        assert s.lower() in line, f"{s!r} not in {lines[0]!r}"
    return lines[0]


def refuse(
    capsys,
    argv: list[str],
    *,
    names: str | Iterable[str],
    fix: str | Iterable[str],
    untouched: Iterable[str | Path] = (),
    rc: int = 2,
) -> str:
    """Run `nanogpt *argv` in this process and check that it refuses cleanly; returns the stderr line."""
    untouched = list(untouched)
    before = snapshot(untouched)
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    line = check_refusal(code, err, rc=rc, names=names, fix=fix)
    assert snapshot(untouched) == before, "a file the command was pointed at changed"
    return line


def run_nanogpt(
    argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 300, **kw
) -> subprocess.CompletedProcess:
    """`python -m nanogpt *argv` in a fresh interpreter (text mode, output captured)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "nanogpt", *argv],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kw,
    )


def refuse_subprocess(
    argv: list[str],
    *,
    names: str | Iterable[str],
    fix: str | Iterable[str],
    untouched: Iterable[str | Path] = (),
    rc: int = 2,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> str:
    """`refuse`, in a fresh `python -m nanogpt` process."""
    untouched = list(untouched)
    before = snapshot(untouched)
    r = run_nanogpt(argv, env=env, timeout=timeout)
    line = check_refusal(r.returncode, r.stderr, rc=rc, names=names, fix=fix)
    assert snapshot(untouched) == before, "a file the command was pointed at changed"
    return line


def mount_tmpfs(where: Path, options: str) -> bool:
    """Mount a small tmpfs at `where` (root only; a container may still refuse): a real small or read-only disk.

    False where it cannot: the test then injects the same OSError at the write instead.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)]
    return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path | None]:
    """A tmpfs of `size` (e.g. "40k") mounted at the new folder `where`, unmounted afterwards; None where
    none can be mounted (the test then makes the same OSError at the write instead)."""
    where.mkdir()
    mounted = mount_tmpfs(where, f"size={size}")
    try:
        yield where if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(where)], capture_output=True, timeout=10)
