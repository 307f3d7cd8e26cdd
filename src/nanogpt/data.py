"""Token shards on disk: the format, memory-mapped reading, and random-window batches.

A prepared data folder holds `meta.json` and shards `train_00000.bin`, `val_00000.bin`, ... Each shard
is a 32-byte header (magic, format version, dtype, token count, vocab size) followed by uint16 token
ids; documents are separated by `<|endoftext|>`. `nanogpt prepare` (prepare.py) writes them.

    data = TokenData("data/builtin")
    batches = BatchSampler(data.split("train"), batch_size=12, block_size=512, seed=1337)
    x, y = batches.next()  # (12, 512) int64 inputs and next-token targets
"""

from __future__ import annotations

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
        self._f.write(HEADER.pack(MAGIC, FORMAT_VERSION, DTYPE.itemsize, 0, vocab_size, 0))

    def write(self, tokens: np.ndarray | list[int]) -> None:
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() >= min(self.vocab_size, 2**16)):
            raise ValueError(f"token id out of range for vocab_size={self.vocab_size}")
        self._f.write(arr.astype(DTYPE, copy=False).tobytes())
        self.n_tokens += arr.size

    def close(self) -> Path:
        self._f.seek(0)
        self._f.write(HEADER.pack(MAGIC, FORMAT_VERSION, DTYPE.itemsize, self.n_tokens, self.vocab_size, 0))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
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


def read_shard(path: str | Path) -> np.memmap:
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
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            raise UserError(
                f"{meta_path} is corrupt; run `nanogpt prepare --out {self.path}` again"
            ) from None
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

    def split(self, name: str) -> list[np.memmap]:
        splits = self.meta.get("splits", {})
        if name not in splits:
            raise UserError(
                f"data folder {self.path} has no {name!r} split (it has {', '.join(splits) or 'none'})"
            )
        return [read_shard(self.path / s) for s in splits[name]["shards"]]

    def num_tokens(self, name: str) -> int:
        return int(self.meta["splits"][name]["tokens"])


class BatchSampler:
    """Random (block_size + 1)-token windows from a list of shards, drawn from a seeded generator.

    The generator's state is the whole data position: `state()` / `load_state()` make resume exact.
    Under DDP each rank passes its own `rank`, which gives it an independent stream of windows.
    """

    def __init__(
        self, shards: list[np.ndarray], batch_size: int, block_size: int, seed: int, rank: int = 0
    ) -> None:
        self.shards = [s for s in shards if len(s) > block_size]
        if not self.shards:
            total = sum(len(s) for s in shards)
            raise UserError(
                f"the split holds {total} tokens, too few for one window of {block_size + 1}; "
                "use more data or a smaller context_length"
            )
        self.batch_size, self.block_size = batch_size, block_size
        starts = np.array([len(s) - block_size for s in self.shards], dtype=np.float64)  # valid offsets
        self.weights = starts / starts.sum()
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        which = self.rng.choice(len(self.shards), size=self.batch_size, p=self.weights)
        rows = []
        for i in which:
            shard = self.shards[i]
            off = int(self.rng.integers(0, len(shard) - self.block_size))
            rows.append(np.asarray(shard[off : off + self.block_size + 1], dtype=np.int64))
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state
