"""Token shards on disk: the format, memory-mapped reading, and random-window batches.

A prepared data folder holds `meta.json` and shards `train_00000.bin`, `val_00000.bin`, ... Each shard
is a 32-byte header (magic, format version, dtype, token count, vocab size) followed by uint16 token
ids; documents are separated by `<|endoftext|>`. `nanogpt prepare` (prepare.py) writes them.

A chat folder (meta.json "format": "chat" or "completions", written by `data.conversations`) holds beside
each `X.bin` a loss-mask shard `X.mask`: the same header (magic NGPTMASK) and one uint8 per token, bit 0 set
where the token is a trained target, bit 1 where a conversation starts. `BatchSampler` then fills each row
with whole conversations (packed, never split across rows), pads the rest with `<|endoftext|>` and sets
the targets that are not trained, padding included, to IGNORE (-100), which both backends' losses skip.

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

from nanogpt.data.tokenizer import EOT_ID
from nanogpt.errors import UserError

MAGIC = b"NGPTTOKS"
MASK_MAGIC = b"NGPTMASK"
MASK_DTYPE = np.dtype("u1")
TRAINED, STARTS = 1, 2  # the bits of a mask byte: a trained target; the first token of a conversation
CHAT_FORMATS = ("chat", "completions")  # meta.json "format" of a folder with loss masks
IGNORE = -100  # a target the loss skips (nanogpt.distill.chunked.IGNORE, nanogpt.mlx.losses.IGNORE)
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
    (`MaskWriter` writes a loss-mask shard the same way.)

    A crash leaves only a `.tmp` file behind, never a shard that looks complete but is not.
    """

    magic: bytes = MAGIC
    dtype: np.dtype = DTYPE

    def __init__(self, path: str | Path, vocab_size: int) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.vocab_size = vocab_size
        self.n_tokens = 0
        self._f = open(self.tmp, "wb")  # noqa: SIM115 (closed by close()/abort())
        try:
            self._guarded(
                _write,
                self._f,
                HEADER.pack(self.magic, FORMAT_VERSION, self.dtype.itemsize, 0, vocab_size, 0),
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
        self._guarded(_write, self._f, arr.astype(self.dtype, copy=False).tobytes())
        self.n_tokens += arr.size

    def close(self) -> Path:
        self._f.seek(0)
        header = HEADER.pack(
            self.magic, FORMAT_VERSION, self.dtype.itemsize, self.n_tokens, self.vocab_size, 0
        )
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


class MaskWriter(ShardWriter):
    """A loss-mask shard `X.mask`: uint8 bytes of TRAINED | STARTS bits, one per token of `X.bin`."""

    magic, dtype = MASK_MAGIC, MASK_DTYPE

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, (TRAINED | STARTS) + 1)


def mask_path(shard: str | Path) -> Path:
    """The loss-mask shard beside token shard `shard` (X.bin -> X.mask)."""
    return Path(shard).with_suffix(".mask")


def write_shard(path: str | Path, tokens: np.ndarray | list[int], vocab_size: int) -> Path:
    w = ShardWriter(path, vocab_size)
    w.write(tokens)
    return w.close()


def read_header(path: str | Path, magic: bytes = MAGIC, dtype: np.dtype = DTYPE) -> ShardHeader:
    p = Path(path)
    expect_magic, expect_dtype = magic, dtype
    if not p.is_file():
        raise UserError(f"token shard {p} not found; run `nanogpt prepare` to (re)create the data folder")
    with open(p, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise UserError(
            f"token shard {p} is truncated (no complete header); delete it and run `nanogpt prepare` again"
        )
    magic, version, itemsize, n_tokens, vocab_size, _ = HEADER.unpack(raw)
    if magic != expect_magic:
        what = "loss-mask" if expect_magic == MASK_MAGIC else "token"
        raise UserError(
            f"{p} is not a nanogpt {what} shard (wrong magic {magic!r}); run `nanogpt prepare` to create one"
        )
    if version != FORMAT_VERSION:
        raise UserError(
            f"token shard {p} has format version {version}, this nanogpt reads version {FORMAT_VERSION}; "
            "run `nanogpt prepare` again to rebuild it"
        )
    if itemsize != expect_dtype.itemsize:
        raise UserError(
            f"token shard {p} stores {itemsize}-byte tokens, expected {expect_dtype.itemsize}; rebuild it with `nanogpt prepare`"
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


def read_mask(shard: str | Path, n_tokens: int) -> np.ndarray:
    """The loss mask beside token shard `shard` (memory-mapped), checked to hold one byte per token."""
    p = mask_path(shard)
    if not p.is_file():
        raise UserError(
            f"loss-mask shard {p} not found beside {Path(shard).name}; prepare the chat data again "
            "(`nanogpt prepare --force`)"
        )
    h = read_header(p, MASK_MAGIC, MASK_DTYPE)
    if h.n_tokens != n_tokens:
        raise UserError(
            f"loss-mask shard {p} holds {h.n_tokens} entries for {n_tokens} tokens; prepare the chat data "
            "again (`nanogpt prepare --force`)"
        )
    if n_tokens == 0:
        return np.zeros(0, dtype=MASK_DTYPE)
    return np.memmap(p, dtype=MASK_DTYPE, mode="r", offset=HEADER.size, shape=(n_tokens,))


def write_meta(
    folder: str | Path, splits: dict[str, dict[str, Any]], source: dict[str, Any], fmt: str = "nanogpt-tokens"
) -> Path:
    """Write `meta.json` last, atomically: its presence marks a complete data folder.

    `splits` maps a split name to {"shards": [file names], "tokens": int, "documents": int}; `fmt` is
    "nanogpt-tokens" (plain text) or one of CHAT_FORMATS (shards with loss masks).
    """
    folder = Path(folder)
    meta = {
        "format": fmt,
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
            if self.is_chat:  # checked here, so a training run refuses a folder without them at once
                read_mask(self.path / s, len(shards[-1]))
        return shards

    @property
    def is_chat(self) -> bool:
        """Whether this folder holds conversations with loss masks (meta.json "format" chat/completions)."""
        return self.meta.get("format") in CHAT_FORMATS

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

    Shards with loss masks (`masks`, or a `.mask` file beside each memory-mapped shard of a chat folder)
    are sampled as whole conversations instead: see `Conversations`.
    """

    def __init__(
        self,
        shards: list[np.ndarray],
        batch_size: int,
        context_length: int,
        seed: int,
        rank: int = 0,
        vocab_size: int = 50257,
        masks: list[np.ndarray] | None = None,
    ) -> None:
        self.batch_size, self.context_length, self.vocab_size = batch_size, context_length, vocab_size
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))
        masks = masks if masks is not None else _masks_beside(shards)
        self.conversations = Conversations(shards, masks, context_length) if masks is not None else None
        if self.conversations is not None:
            self.shards = shards
            return
        self.shards = [s for s in shards if len(s) > context_length]
        if not self.shards:
            total = sum(len(s) for s in shards)
            names = ", ".join(dict.fromkeys(Path(_shard_name(s)).name for s in shards)) or "the split"
            raise UserError(
                f"{names} hold{'s' if len(shards) == 1 else ''} {total} tokens, too few for one window of "
                f"{context_length + 1} (context_length {context_length} + 1); prepare more text for that split "
                "(`nanogpt prepare --force`, a larger --val-fraction for val) or use a smaller context_length"
            )
        starts = np.array([len(s) - context_length for s in self.shards], dtype=np.float64)  # valid offsets
        self.weights = starts / starts.sum()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.conversations is not None:
            return self.conversations.batch(self.rng, self.batch_size, self.vocab_size)
        which = self.rng.choice(len(self.shards), size=self.batch_size, p=self.weights)
        rows = []
        for i in which:
            shard = self.shards[i]
            off = int(self.rng.integers(0, len(shard) - self.context_length))
            rows.append(np.asarray(shard[off : off + self.context_length + 1], dtype=np.int64))
        stacked = np.stack(rows)  # (B, T + 1)
        if stacked.max() >= self.vocab_size:
            bad = next(i for i, row in zip(which, rows, strict=True) if row.max() >= self.vocab_size)
            _out_of_vocab(self.shards[bad], int(stacked.max()), self.vocab_size)
        batch = torch.from_numpy(stacked)
        return batch[:, :-1], batch[:, 1:]

    def state(self) -> dict[str, Any]:
        rng = dict(self.rng.bit_generator.state)
        return rng if self.conversations is None else {"rng": rng, "pending": self.conversations.pending}

    def load_state(self, state: dict[str, Any]) -> None:
        if self.conversations is None:
            self.rng.bit_generator.state = state
            return
        self.rng.bit_generator.state = state["rng"]
        self.conversations.pending = int(state["pending"])


def _out_of_vocab(shard: np.ndarray, token: int, vocab_size: int) -> None:
    raise UserError(
        f"token shard {_shard_name(shard)} holds token id {token}, past the vocabulary ({vocab_size}); it "
        "is corrupt: re-run `nanogpt prepare --force` for that folder"
    )


def _masks_beside(shards: list[np.ndarray]) -> list[np.ndarray] | None:
    """The loss masks of memory-mapped shards that have a `.mask` beside them (a chat folder), else None."""
    names = [getattr(s, "filename", None) for s in shards]  # np.memmap's; None for an in-memory array
    if not names or not all(n and mask_path(n).is_file() for n in names):
        return None
    return [read_mask(str(n), len(s)) for n, s in zip(names, shards, strict=True)]


def split_conversations(
    data_dir: str | Path, split: str = "val"
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """A chat folder's split as whole conversations, each (ids, trained: bool per token, True where the
    token is a trained target); None for a folder of plain text (no loss masks)."""
    shards = TokenData(data_dir).split(split)
    masks = _masks_beside(shards)
    if masks is None:
        return None
    out = []
    for shard, m in zip(shards, masks, strict=True):
        for a, n in zip(*conversation_spans(m), strict=True):
            ids, trained = np.asarray(shard[a : a + n], dtype=np.int64), np.asarray(m[a : a + n]) & TRAINED
            out.append((ids, trained.astype(bool)))
    return out


def conversation_spans(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first position and the length of each conversation in a shard, from its loss mask's STARTS bits."""
    starts = np.flatnonzero(np.asarray(mask) & STARTS)
    return starts, np.diff(np.append(starts, len(mask)))


class Conversations:
    """The conversations of masked shards, drawn at random and packed whole into (B, T + 1) rows.

    Each row takes conversations until the next one does not fit; that one starts the next row (`pending`,
    saved with the generator, so resume is exact). The rest of a row is `<|endoftext|>` padding. Targets
    whose mask lacks the TRAINED bit, and the padding, are IGNORE. A conversation longer than T + 1 tokens
    cannot be trained whole and is refused (prepare refuses them for its --context-length).
    """

    def __init__(self, shards: list[np.ndarray], masks: list[np.ndarray], context_length: int) -> None:
        self.shards, self.masks, self.window = shards, masks, context_length + 1
        where, starts, lengths = [], [], []
        for i, m in enumerate(masks):
            s, n = conversation_spans(m)
            where.append(np.full(s.size, i))
            starts.append(s)
            lengths.append(n)
        self.where, self.starts = np.concatenate(where), np.concatenate(starts)
        self.lengths = np.concatenate(lengths)
        if self.starts.size == 0:
            raise UserError("the split holds no conversations; prepare the chat data again with more records")
        longest = int(self.lengths.max())
        if longest > self.window:
            raise UserError(
                f"a conversation of {longest} tokens in {_shard_name(shards[int(self.where[self.lengths.argmax()])])} "
                f"does not fit context_length {context_length} (+1); train with a longer context or prepare "
                f"with --context-length {context_length}, which refuses or skips (--skip-bad) such records"
            )
        self.pending = -1  # a conversation drawn that did not fit the last row: the next row starts with it

    def batch(
        self, rng: np.random.Generator, batch_size: int, vocab_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.full((batch_size, self.window), EOT_ID, dtype=np.int64)
        trained = np.zeros((batch_size, self.window), dtype=bool)
        for r in range(batch_size):
            filled = 0
            while True:
                c = self.pending if self.pending >= 0 else int(rng.integers(self.starts.size))
                n, i, s = int(self.lengths[c]), int(self.where[c]), int(self.starts[c])
                if filled + n > self.window:
                    self.pending = c
                    break
                rows[r, filled : filled + n] = self.shards[i][s : s + n]
                trained[r, filled : filled + n] = np.asarray(self.masks[i][s : s + n]) & TRAINED
                filled, self.pending = filled + n, -1
        if rows.max() >= vocab_size:
            _out_of_vocab(self.shards[0], int(rows.max()), vocab_size)
        x = torch.from_numpy(rows[:, :-1].copy())
        y = torch.from_numpy(np.where(trained[:, 1:], rows[:, 1:], IGNORE))
        return x, y
