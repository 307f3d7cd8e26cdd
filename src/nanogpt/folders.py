"""Output folders: which ones nanogpt wrote, the one rule for replacing them, and the lock on a run folder.

Every command that writes a folder (`train`, `distill`, `demo`, `import`, `export`, `prepare`) calls `claim`
first. It lets the command write a folder that is absent, empty, or one that nanogpt itself wrote for the
same purpose and that holds nothing else: the `.nanogpt.json` marker names the purpose and lists the entries
nanogpt wrote, and any other entry (a note, an `eval/` folder the user added) makes `claim` refuse, in one
line naming `--force`. A file's name alone never proves a folder is ours: without a marker it is the user's.
A marker without a list (a run folder, which writes its files for as long as it trains, or a folder of an
older nanogpt) is checked against the entries a folder of that purpose holds (`LAYOUT`). Nothing is deleted here:
`claim` only decides, and `clear` removes what the caller was allowed to replace.

A run folder is locked while a process writes it (`RunLock`): an OS file lock that the kernel releases
when the process ends, even by SIGKILL (the file may stay; a lock on it is what counts), so a second
`train --resume` on the same run is refused with the PID of the holder instead of interleaving
checkpoints and log lines.

    claim(out, "checkpoint", force=args.force)
    with atomic_dir(out) as tmp: ...; mark(tmp, "checkpoint")
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from nanogpt import __version__
from nanogpt.errors import UserError

MARKER = ".nanogpt.json"  # {"purpose": ..., "files": [...], "nanogpt_version": ...}: nanogpt wrote this folder
STATE_JSON = "state.json"  # a checkpoint's training state (nanogpt.train.checkpoint writes it)
LOCK = ".nanogpt.lock"  # exists while a process writes the run folder, and holds its PID

PURPOSES = {  # what a folder nanogpt wrote is for (its marker says which)
    "run": "a training run",
    "demo": "a demo run",
    "checkpoint": "an imported checkpoint",
    "export": "an export (a Hugging Face folder or GGUF)",
    "data": "a prepared data folder",
}
_RUN_LAYOUT = (
    "config.json", "train_config.json", "log.jsonl", "log.jsonl.tmp", "loss.png", "trackers.json",
    "last", "last.tmp", "last.old", "best", "best.tmp", "best.old", "tensorboard", "wandb", "mlruns", "mlflow.db",
    "lineage.json", "lineage.json.tmp",
)  # fmt: skip
# the entries a folder of each purpose holds, for a marker that lists none (fnmatch patterns, top level only)
LAYOUT: dict[str, tuple[str, ...]] = {
    "run": _RUN_LAYOUT,
    "demo": (*_RUN_LAYOUT, "demo.json", "hf"),
    "checkpoint": ("config.json", "model.safetensors"),
    "export": (
        "config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer*.json",
        "special_tokens_map.json", "vocab.json", "merges.txt", "*_nanogpt.py", "model.gguf", "Modelfile",
    ),  # fmt: skip
    "data": (
        "meta.json", "meta.json.tmp", "prepare.state.json", "prepare.state.json.tmp", "train_*.bin*", "val_*.bin*",
    ),  # fmt: skip
}


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The marker of the folder at `path`, or None if it has none (or a damaged one, which proves nothing)."""
    try:
        info = json.loads((Path(path) / MARKER).read_text())
    except (ValueError, OSError):
        return None
    if not isinstance(info, dict):
        return None
    purpose = info.get("purpose", info.get("kind"))  # "kind": the same, as earlier markers say it
    return {**info, "purpose": purpose} if purpose in PURPOSES else None


def folder_purpose(path: str | Path) -> str | None:
    """What nanogpt wrote the folder at `path` for (see PURPOSES), or None if nanogpt did not write it."""
    info = read_marker(path)
    return None if info is None else str(info["purpose"])


def foreign_entries(path: str | Path) -> list[str]:
    """The entries of a folder that nanogpt did not write (paths relative to it), sorted.

    Ours: the marker's `files` list, or its purpose's LAYOUT when it has none. A subfolder with a marker of
    its own (the demo's `hf/` export) is checked the same way, so a note dropped inside it counts too.
    """
    path = Path(path)
    info = read_marker(path)
    if info is None:
        return sorted(p.name for p in path.iterdir() if p.name not in (MARKER, LOCK))
    listed = info.get("files")
    ours = tuple(listed) if isinstance(listed, list) else LAYOUT[info["purpose"]]
    found: list[str] = []
    for child in path.iterdir():
        if child.name in (MARKER, LOCK):
            continue
        if not any(fnmatch.fnmatchcase(child.name, str(pattern)) for pattern in ours):
            found.append(child.name)
        elif child.is_dir() and not child.is_symlink() and read_marker(child) is not None:
            found += [f"{child.name}/{name}" for name in foreign_entries(child)]
    return sorted(found)


def mark(folder: str | Path, purpose: str, *, files: list[str] | None = None, **facts: object) -> None:
    """Write the marker that lets a later command recognise (and replace) this folder.

    `files`: the entries this command wrote; by default everything in `folder` now (a scratch folder that
    atomic_dir is about to publish holds nothing else). Run, demo and data folders list none by default:
    they are written over time and a killed one is continued, so they are checked against LAYOUT.
    """
    folder = Path(folder)
    if files is None and purpose not in ("run", "demo", "data"):
        files = sorted(p.name for p in folder.iterdir() if p.name not in (MARKER, LOCK))
    info = {"purpose": purpose, "nanogpt_version": __version__, **facts}
    if files is not None:
        info["files"] = files
    (folder / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def recover_dir(path: str | Path) -> Path:
    """The folder to read: `path`, or `path.old` if a crash struck between the two renames of atomic_dir."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        return old
    return path


@dataclass(frozen=True)
class RunFolder:
    """A training run's folder, its layout spelled in this one place:

        RUN/config.json  train_config.json  log.jsonl  loss.png  .nanogpt.json
        RUN/last/  (resume point: weights + training state)   RUN/best/  (lowest held-out loss)
        RUN/trackers.json  RUN/tensorboard/  RUN/wandb/   (only with --tracker)
    """

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def train_config(self) -> Path:
        return self.path / "train_config.json"

    @property
    def log(self) -> Path:
        return self.path / "log.jsonl"

    @property
    def plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def trackers(self) -> Path:
        """Which --tracker runs the run uses, and their ids (nanogpt.train.tracking)."""
        return self.path / "trackers.json"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def last(self) -> Path:
        return self.path / "last"

    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def resume_point(self) -> Path:
        """`last/`, or its `.old` copy when a crash struck while it was being replaced."""
        return recover_dir(self.last)

    def has_checkpoint(self) -> bool:
        """Whether the run holds a resume point (`last/` with its training state, or the `.old` copy)."""
        return (self.resume_point / STATE_JSON).is_file()


def claim(path: str | Path, purpose: str, *, force: bool = False, flag: str = "--out") -> bool:
    """Check that `path` may be written as a folder for `purpose`; True if something there will be replaced.

    Allowed: nothing there, an empty folder, a folder nanogpt wrote for the same purpose (a training run only
    while it holds no checkpoint: a run that stopped before its first one restarts by the same command),
    or anything at all with `force`. Refused otherwise, in one line that names the fix.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return False
    if force:
        return True
    what = PURPOSES[purpose]
    if not path.is_dir():
        raise UserError(
            f"{flag} {path} is a file, not a folder; choose another {flag} or pass --force to replace it"
        )
    if not any(p.name not in (MARKER, LOCK) for p in path.iterdir()):
        return True
    found = folder_purpose(path)
    if found is None:
        raise UserError(
            f"{flag} {path} is a folder nanogpt did not write (it holds other files); choose another {flag} "
            f"or pass --force to replace it with {what}"
        )
    if found != purpose:
        raise UserError(
            f"{flag} {path} holds {PURPOSES[found]}, not {what}; choose another {flag} or pass --force to replace it"
        )
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(
            f"{flag} {path} holds {what} but also files nanogpt did not write ({shown}); move them out, "
            f"choose another {flag}, or pass --force to replace the whole folder"
        )
    if purpose == "run" and RunFolder(path).has_checkpoint():
        raise UserError(
            f"{flag} {path} already holds a training run with checkpoints; pass --resume to continue it, "
            f"choose another {flag}, or pass --force to start it over"
        )
    return True


def clear(path: str | Path, keep: tuple[str, ...] = ()) -> None:
    """Remove what `claim` allowed the caller to replace: a file, or a folder's contents but `keep`."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        if path.exists() or path.is_symlink():
            path.unlink()
        return
    for child in path.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


class RunLock:
    """An exclusive OS lock on `RUN/.nanogpt.lock` for the life of this object (see module docstring)."""

    def __init__(self, run: str | Path) -> None:
        self.path = Path(run) / LOCK
        self._fh: IO[str] | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks through fcntl; run unguarded
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fh = open(self.path, "a+")  # noqa: SIM115 (held open for as long as the run is being written)
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                fh.close()
                raise UserError(
                    f"run folder {self.path.parent} is being written by another nanogpt process (PID {holder}); "
                    "wait for it to finish or stop it, then run again"
                ) from None
            # the holder before us unlinks the file as it lets go: make sure we locked the file on disk now
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino:
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:  # unlink first, then unlock: a waiter that opened the old file retries
            self.path.unlink(missing_ok=True)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
