"""Token shards on disk: the format, memory-mapped reading, and random-window batches.

A prepared data folder holds `meta.json` and shards `train_00000.bin`, `val_00000.bin`, ... Each shard
is a 32-byte header (magic, format version, dtype, token count, vocab size) followed by uint16 token
ids; documents are separated by `<|endoftext|>`. `nanogpt prepare` (prepare.py) writes them.

    data = TokenData("data/builtin")
    batches = BatchSampler(data.split("train"), batch_size=12, context_length=512, seed=1337)
    x, y = batches.next()  # (12, 512) int64 inputs and next-token targets
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanogpt.errors import UserError

MAGIC = b"NGPTTOKS"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQII")  # magic, version, itemsize, n_tokens, vocab_size, reserved -> 32 bytes
DTYPE = np.dtype("<u2")  # uint16 holds GPT-2's 50,257 ids
META = "meta.json"
# test hook: "ENOSPC:<bytes>" (or EROFS, EACCES) makes this process's shard writes fail with that error
# once <bytes> have been written, as on a full or read-only disk where no small filesystem can be mounted
WRITE_FAULT_ENV = "NANOGPT_TEST_WRITE_FAULT"
_written = [0]  # bytes written through `_write` by this process (read only by the test hook)


def _write(f: Any, data: bytes) -> None:
    """Every shard byte goes through here: the one place a test makes the disk fill up."""
    fault = os.environ.get(WRITE_FAULT_ENV)
    if fault:
        name, _, budget = fault.partition(":")
        _written[0] += len(data)
        if _written[0] > int(budget or 0):
            code = getattr(errno, name)
            raise OSError(code, os.strerror(code))
    f.write(data)


@dataclass(frozen=True)
class ShardHeader:
    version: int
    itemsize: int
    n_tokens: int
    vocab_size: int


class ShardWriter:
    """Writes one shard incrementally to `path.tmp`, then fixes the header and renames it into place.

    A crash leaves only a `.tmp` file behind, never a shard that looks complete but is not.
    """

    def __init__(self, path: str | Path, vocab_size: int) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.vocab_size = vocab_size
        self.n_tokens = 0
        self._f = open(self.tmp, "wb")  # noqa: SIM115 (closed by close()/abort())
        try:
            self._guarded(
                _write, self._f, HEADER.pack(MAGIC, FORMAT_VERSION, DTYPE.itemsize, 0, vocab_size, 0)
            )
        except OSError:  # no writer object to abort() exists yet: clean up here
            self.abort()
            raise

    def _guarded(self, fn: Any, *args: Any) -> Any:
        """Run one I/O step; an OSError without a file name (a full disk at write) gets the shard's."""
        try:
            return fn(*args)
        except OSError as e:
            if e.filename is None:
                raise OSError(e.errno, e.strerror, str(self.tmp)) from e
            raise

    def write(self, tokens: np.ndarray | list[int]) -> None:
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() >= min(self.vocab_size, 2**16)):
            raise ValueError(f"token id out of range for vocab_size={self.vocab_size}")
        self._guarded(_write, self._f, arr.astype(DTYPE, copy=False).tobytes())
        self.n_tokens += arr.size

    def close(self) -> Path:
        self._f.seek(0)
        header = HEADER.pack(MAGIC, FORMAT_VERSION, DTYPE.itemsize, self.n_tokens, self.vocab_size, 0)
        self._guarded(_write, self._f, header)
        self._guarded(self._f.flush)  # buffered bytes reach the disk here: a full disk may show only now
        self._guarded(os.fsync, self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes, and the disk may still be full
            self._f.close()
        self.tmp.unlink(missing_ok=True)


def write_shard(path: str | Path, tokens: np.ndarray | list[int], vocab_size: int) -> Path:
    w = ShardWriter(path, vocab_size)
    w.write(tokens)
    return w.close()


def read_header(path: str | Path) -> ShardHeader:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"token shard {p} not found; run `nanogpt prepare` to (re)create the data folder")
    with open(p, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise UserError(
            f"token shard {p} is truncated (no complete header); delete it and run `nanogpt prepare` again"
        )
    magic, version, itemsize, n_tokens, vocab_size, _ = HEADER.unpack(raw)
    if magic != MAGIC:
        raise UserError(
            f"{p} is not a nanogpt token shard (wrong magic {magic!r}); run `nanogpt prepare` to create one"
        )
    if version != FORMAT_VERSION:
        raise UserError(
            f"token shard {p} has format version {version}, this nanogpt reads version {FORMAT_VERSION}; "
            "run `nanogpt prepare` again to rebuild it"
        )
    if itemsize != DTYPE.itemsize:
        raise UserError(
            f"token shard {p} stores {itemsize}-byte tokens, expected {DTYPE.itemsize}; rebuild it with `nanogpt prepare`"
        )
    expected = HEADER.size + n_tokens * itemsize
    if p.stat().st_size != expected:
        raise UserError(
            f"token shard {p} is {p.stat().st_size} bytes but its header promises {expected}; "
            "it is truncated or corrupt: run `nanogpt prepare` again"
        )
    return ShardHeader(version, itemsize, n_tokens, vocab_size)


def read_shard(path: str | Path) -> np.ndarray:
    """Validate the header and memory-map the tokens (nothing is read into RAM)."""
    h = read_header(path)
    if h.n_tokens == 0:
        return np.zeros(0, dtype=DTYPE)  # np.memmap refuses empty files
    return np.memmap(path, dtype=DTYPE, mode="r", offset=HEADER.size, shape=(h.n_tokens,))


def write_meta(folder: str | Path, splits: dict[str, dict[str, Any]], source: dict[str, Any]) -> Path:
    """Write `meta.json` last, atomically: its presence marks a complete data folder.

    `splits` maps a split name to {"shards": [file names], "tokens": int, "documents": int}.
    """
    folder = Path(folder)
    meta = {
        "format": "nanogpt-tokens",
        "version": FORMAT_VERSION,
        "tokenizer": "gpt2",
        "vocab_size": 50257,
        "dtype": DTYPE.name,
        "splits": splits,
        "source": source,
    }
    tmp = folder / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / META)
    return folder / META


class TokenData:
    """A prepared data folder: `meta.json` plus the shards it lists."""

    def __init__(self, path: str | Path, tokenizer: str = "gpt2", vocab_size: int = 50257) -> None:
        self.path = Path(path)
        meta_path = self.path / META
        redo = f"run `nanogpt prepare --out {self.path} --force` to rebuild it"
        if self.path.is_file():
            raise UserError(
                f"--data {self.path} is a file, not a prepared data folder; pass the folder "
                "`nanogpt prepare` wrote (the one holding meta.json)"
            )
        if not self.path.is_dir():
            raise UserError(
                f"data folder {self.path} not found; create it with `nanogpt prepare --out {self.path}`"
            )
        if not meta_path.is_file():
            raise UserError(
                f"{meta_path} not found: {self.path} is not a prepared data folder (or its preparation did not "
                f"finish); run `nanogpt prepare --out {self.path}`"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError:  # not JSON, or not UTF-8
            raise UserError(f"{meta_path} is corrupt (not JSON); {redo}") from None
        if not isinstance(meta, dict):
            raise UserError(f"{meta_path} holds a JSON {type(meta).__name__}, not an object; {redo}")
        self.meta: dict[str, Any] = meta
        if self.meta.get("version") != FORMAT_VERSION:
            raise UserError(
                f"data folder {self.path} has format version {self.meta.get('version')}, this nanogpt reads "
                f"version {FORMAT_VERSION}; run `nanogpt prepare` again"
            )
        if self.meta.get("tokenizer") != tokenizer or self.meta.get("vocab_size") != vocab_size:
            raise UserError(
                f"data folder {self.path} was tokenized with {self.meta.get('tokenizer')!r} "
                f"(vocab {self.meta.get('vocab_size')}), the model expects {tokenizer!r} (vocab {vocab_size}); "
                "prepare the data again with this tokenizer"
            )
        splits = self.meta.get("splits")
        ok = isinstance(splits, dict) and all(_split_record_ok(r) for r in splits.values())
        if not ok:
            raise UserError(f"{meta_path} lacks a valid 'splits' table (shards and token counts); {redo}")

    def split(self, name: str) -> list[np.ndarray]:
        """The split's shards, memory-mapped; an empty split is refused (nothing could be sampled from it)."""
        splits = self.meta["splits"]
        if name not in splits:
            raise UserError(
                f"data folder {self.path} has no {name!r} split (it has {', '.join(splits) or 'none'}); "
                f"run `nanogpt prepare --out {self.path} --force` to write both train and val"
            )
        if self.num_tokens(name) == 0:
            fix = "--val-fraction 0.05" if name == "val" else "more text in --source"
            raise UserError(
                f"the {name!r} split of {self.path} is empty (0 tokens); prepare the data again with a "
                f"{name} split: `nanogpt prepare --out {self.path} --force {fix}`"
            )
        shards = []
        for s in splits[name]["shards"]:
            if read_header(self.path / s).vocab_size > self.meta["vocab_size"]:
                raise UserError(
                    f"token shard {self.path / s} claims a vocabulary larger than its folder's "
                    f"({self.meta['vocab_size']}); re-run `nanogpt prepare --out {self.path} --force`"
                )
            shards.append(read_shard(self.path / s))
        return shards

    def num_tokens(self, name: str) -> int:
        return int(self.meta["splits"][name]["tokens"])


def _split_record_ok(rec: Any) -> bool:
    """A meta.json split entry: {"shards": [file names], "tokens": int, ...}."""
    if not isinstance(rec, dict) or not isinstance(rec.get("tokens"), int) or isinstance(rec["tokens"], bool):
        return False
    shards = rec.get("shards")
    return isinstance(shards, list) and all(isinstance(s, str) and "/" not in s and s for s in shards)


def _shard_name(shard: np.ndarray) -> str:
    """The file behind a memory-mapped shard, for messages ('a shard' for an in-memory array)."""
    filename = getattr(shard, "filename", None)
    return str(filename) if filename else "a shard"


class BatchSampler:
    """Random (context_length + 1)-token windows from a list of shards, drawn from a seeded generator.

    The generator's state is the whole data position: `state()` / `load_state()` make resume exact.
    Under DDP each rank passes its own `rank`, which gives it an independent stream of windows.
    Every batch is checked against `vocab_size`: an id past the vocabulary (a corrupt shard, or one from
    another tokenizer whose header was rewritten) would index past the embedding table, an IndexError on
    CPU and a device-side assert on CUDA. A max over the batch costs ~2 us per 12 x 513 batch (next() takes
    ~100 us); a max over every shard at open would read the whole corpus (0.1 ms for the builtin 1.5M
    tokens, but minutes for 10B).
    """

    def __init__(
        self,
        shards: list[np.ndarray],
        batch_size: int,
        context_length: int,
        seed: int,
        rank: int = 0,
        vocab_size: int = 50257,
    ) -> None:
        self.shards = [s for s in shards if len(s) > context_length]
        if not self.shards:
            total = sum(len(s) for s in shards)
            names = ", ".join(dict.fromkeys(Path(_shard_name(s)).name for s in shards)) or "the split"
            raise UserError(
                f"{names} hold{'s' if len(shards) == 1 else ''} {total} tokens, too few for one window of "
                f"{context_length + 1} (context_length {context_length} + 1); prepare more text for that split "
                "(`nanogpt prepare --force`, a larger --val-fraction for val) or use a smaller context_length"
            )
        self.batch_size, self.context_length, self.vocab_size = batch_size, context_length, vocab_size
        starts = np.array([len(s) - context_length for s in self.shards], dtype=np.float64)  # valid offsets
        self.weights = starts / starts.sum()
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        which = self.rng.choice(len(self.shards), size=self.batch_size, p=self.weights)
        rows = []
        for i in which:
            shard = self.shards[i]
            off = int(self.rng.integers(0, len(shard) - self.context_length))
            rows.append(np.asarray(shard[off : off + self.context_length + 1], dtype=np.int64))
        stacked = np.stack(rows)  # (B, T + 1)
        if stacked.max() >= self.vocab_size:
            bad = next(i for i, row in zip(which, rows, strict=True) if row.max() >= self.vocab_size)
            raise UserError(
                f"token shard {_shard_name(self.shards[bad])} holds token id {int(stacked.max())}, past "
                f"the vocabulary ({self.vocab_size}); it is corrupt: re-run `nanogpt prepare --force` "
                "for that folder"
            )
        batch = torch.from_numpy(stacked)
        return batch[:, :-1], batch[:, 1:]

    def state(self) -> dict[str, Any]:
        return dict(self.rng.bit_generator.state)

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state
