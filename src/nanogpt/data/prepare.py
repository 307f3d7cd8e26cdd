"""Prepare a corpus (builtin, text, JSONL, Parquet, Hugging Face dataset) -> a folder of token shards.

Documents stream from the source, are tokenized in batches on every core and are written straight to
token shards (`shards.py`'s format), each followed by `<|endoftext|>`: the corpus is never held in memory.

Train/val split, held out by document, in one pass: documents are taken in consecutive blocks of
k = round(1 / val_fraction) (k >= 2, so the val share is 1/k); in each block the document at position
`hash(seed, block) % k` goes to val, the others to train. Val is thus spread evenly over the stream,
needs no document count up front, and nothing is buffered. The first block's val document is its second,
so every corpus of >= 2 documents has one. The builtin corpus (42 works, k = 20) gets 2 or 3.

The val split is never empty. When the first document is all the stream gives (a single .txt file is one
document; or --max-tokens ends inside it), its tail is held out instead: the last max(val_fraction, one
513-token window) of its tokens go to val, as if they were a second document. One line says so, and
meta.json records it (`source.val_tail`, in tokens). We keep text files whole rather than cutting them at
blank lines: a paragraph is not a document, and `<|endoftext|>` between paragraphs would teach the model
to end texts there. A document too short to give train and val one window (the card's context_length
512 + 1) each is refused, with the fix: more text, or several documents.

Shards are `{split}_{i:05d}.bin` of exactly `shard_tokens` tokens (the last of each split smaller; a
document may continue in the next shard). Whenever a shard fills, both splits' open shards are closed and
`prepare.state.json` records the documents done: an interrupted run (no `meta.json`, which is written
last) resumes from there on the same command, re-reading the source but not re-tokenizing what is done.
A full or read-only disk stops the run with one line naming the file; what was saved stays, so the same
command resumes once there is room. prepare deletes only the files it writes (shards, state, meta.json).

    prepare("hf:HuggingFaceFW/fineweb-edu:sample-10BT", "data/fineweb", max_tokens=10_000_000)
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nanogpt.config import ModelConfig
from nanogpt.data.conversations import data_format, say_skipped, write_conversations
from nanogpt.data.shards import CHAT_FORMATS, META, ShardWriter, TokenData, read_header, write_meta
from nanogpt.data.sources import (
    BUILTIN,
    Source,
    default_out_dir,
    describe,
    iter_documents,
    resolve_source,
    source_fingerprint,
)
from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.errors import UserError
from nanogpt.folders import MARKER, claim, folder_purpose, mark

SPLITS = ("train", "val")
STATE = "prepare.state.json"  # progress of an unfinished run; removed once meta.json is written
BATCH_CHARS = 4_000_000  # characters per tokenizer batch: bounds memory, keeps every core busy
BATCH_DOCS = 4096
WINDOW = ModelConfig().context_length + 1  # the card's training window: the least a split can serve


def batched(
    docs: Iterable[str], max_chars: int | None = None, max_docs: int | None = None
) -> Iterator[list[str]]:
    """Tokenizer batches of at most `max_docs` documents / about `max_chars` characters (module defaults)."""
    max_chars, max_docs = max_chars or BATCH_CHARS, max_docs or BATCH_DOCS
    batch: list[str] = []
    chars = 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if chars >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ---- the train/val split -----------------------------------------------------------------------------


def val_every(val_fraction: float) -> int:
    """k: one document in each block of k goes to val."""
    return max(2, round(1 / val_fraction))


def val_position(seed: int, block: int, k: int) -> int:
    """Where block `block`'s val document sits: a stable hash, the same on every machine.

    The first block's is always its second document: any corpus of >= 2 documents holds one out, and a
    single document goes to train.
    """
    digest = hashlib.blake2b(f"{seed}:{block}".encode(), digest_size=8).digest()
    return 1 if block == 0 else int.from_bytes(digest, "little") % k


def is_val(seed: int, index: int, k: int) -> bool:
    """Whether document number `index` (0-based, in stream order) is held out for val."""
    return index % k == val_position(seed, index // k, k)


# ---- writing -----------------------------------------------------------------------------------------


class _SplitShards:
    """One split's shards `{split}_{i:05d}.bin`; one is open at a time, opened on first write."""

    def __init__(self, folder: Path, split: str, vocab_size: int, done: dict[str, Any]) -> None:
        self.folder, self.split, self.vocab_size = folder, split, vocab_size
        self.shards: list[str] = list(done.get("shards", []))
        self.tokens = int(done.get("tokens", 0))
        self.documents = int(done.get("documents", 0))
        self._w: ShardWriter | None = None

    def write(self, tokens: np.ndarray) -> None:
        if self._w is None:
            self._w = ShardWriter(self.folder / f"{self.split}_{len(self.shards):05d}.bin", self.vocab_size)
        self._w.write(tokens)
        self.tokens += tokens.size

    @property
    def open_tokens(self) -> int:
        return self._w.n_tokens if self._w else 0

    def close(self) -> None:
        if self._w is not None:
            self.shards.append(self._w.close().name)
            self._w = None

    def abort(self) -> None:
        if self._w is not None:
            self._w.abort()
            self._w = None

    def record(self) -> dict[str, Any]:
        return {"shards": list(self.shards), "tokens": self.tokens, "documents": self.documents}


class _Progress:
    """Both splits' shards and how far into the document stream they reach; `save()` makes it resumable."""

    def __init__(self, out: Path, settings: dict[str, Any], state: dict[str, Any] | None, vocab: int) -> None:
        state = state or {}
        self.out, self.settings = out, settings
        self.splits = {s: _SplitShards(out, s, vocab, state.get("splits", {}).get(s, {})) for s in SPLITS}
        self.documents = int(state.get("documents_done", 0))  # documents written whole
        self.offset = int(state.get("offset", 0))  # tokens of the next document already written
        self.truncated = bool(state.get("truncated", False))
        self.finished = bool(state.get("finished", False))
        self.val_tail = int(state.get("val_tail", 0))  # tokens of a single document held out as val

    @property
    def tokens(self) -> int:
        return sum(w.tokens for w in self.splits.values())

    def add(self, doc: np.ndarray, split: str, shard_tokens: int) -> None:
        """Write document `doc` (n,) from `self.offset` on; a full shard ends mid-document and is saved."""
        w = self.splits[split]
        if self.offset == 0:
            w.documents += 1
        while True:
            take = min(doc.size - self.offset, shard_tokens - w.open_tokens)
            w.write(doc[self.offset : self.offset + take])
            self.offset += take
            if self.offset == doc.size:
                self.documents, self.offset = self.documents + 1, 0
            if w.open_tokens >= shard_tokens:
                self.save()
            if self.offset == 0:
                return

    def save(self, finished: bool = False) -> None:
        """Close both splits' open shards, then record them: every listed shard is complete on disk."""
        for w in self.splits.values():
            w.close()
        self.finished = finished
        state = {"settings": self.settings, "documents_done": self.documents, "offset": self.offset}
        state |= {"truncated": self.truncated, "finished": finished, "val_tail": self.val_tail}
        state["splits"] = self.records()
        tmp = self.out / (STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.out / STATE)

    def abort(self) -> None:
        for w in self.splits.values():
            w.abort()  # the shards the state file lists stay; the half-written ones go

    def records(self) -> dict[str, dict[str, Any]]:
        return {s: w.record() for s, w in self.splits.items()}


def tokenized(docs: Iterable[str]) -> Iterator[np.ndarray]:
    """Each document's tokens then `<|endoftext|>`, as (n + 1,) uint16 arrays, tokenized in parallel batches."""
    tok = get_tokenizer()
    for batch in batched(docs):
        for ids in tok.encode_batch(batch):
            doc = np.empty(len(ids) + 1, dtype=np.uint16)
            doc[:-1], doc[-1] = ids, tok.eot_id
            yield doc


def _tail_size(n: int, val_fraction: float, cut_by: int | None) -> int:
    """Tokens of a lone document (n tokens) to hold out for val; refuses one too short to split."""
    n_val = max(math.ceil(n * val_fraction), WINDOW)
    if n - n_val < WINDOW:
        if cut_by is not None:
            raise UserError(
                f"--max-tokens {cut_by} ends the stream inside the first document, and {n} tokens are "
                f"too few to hold out a val split (train and val need one {WINDOW}-token window each); "
                f"use --max-tokens {2 * WINDOW} or more"
            )
        raise UserError(
            f"the source is a single document of {n} tokens, too few to hold out a val split (train and val "
            f"need one {WINDOW}-token window each); give at least {2 * WINDOW} tokens of text, or several "
            "documents (a .jsonl with one per line, or a folder of .txt files)"
        )
    return n_val


def _units(
    docs: Iterator[str],
    progress: _Progress,
    val_fraction: float,
    max_tokens: int | None,
    say: Callable[[str], None],
) -> Iterator[np.ndarray]:
    """The tokenized documents to write, after the `progress.documents` already written.

    When the first document is all the stream gives (or --max-tokens ends inside it), val would be empty:
    that document is yielded as two pieces, its head (train) and its tail (val), as if two documents.
    """
    if progress.val_tail:  # resuming such a run: the same two pieces, less those written
        doc = next(tokenized(docs))[:max_tokens]
        yield from (doc[: -progress.val_tail], doc[-progress.val_tail :])[progress.documents :]
        return
    stream = tokenized(itertools.islice(docs, progress.documents, None))
    if progress.documents or progress.offset:
        yield from stream
        return
    first = next(stream, None)
    if first is None:
        return
    if max_tokens is None or first.size < max_tokens:
        second = next(stream, None)
        if second is not None:
            yield first
            yield second
            yield from stream
            return
    cut_by = max_tokens if max_tokens is not None and first.size > max_tokens else None
    doc = first[:max_tokens]
    progress.val_tail = _tail_size(doc.size, val_fraction, cut_by)
    why = "--max-tokens ends the stream inside the first document" if cut_by else "the source is one document"
    say(
        f"note: {why}, so its last {progress.val_tail:,} of {doc.size:,} tokens are held out as the val split"
    )
    yield doc[: -progress.val_tail]
    yield doc[-progress.val_tail :]


def _io_error(e: OSError, out: Path) -> UserError:
    """An OSError met while preparing, as one line: the file, the cause, the fix."""
    where = Path(e.filename) if e.filename else out
    w, o = Path(os.path.abspath(where)), Path(os.path.abspath(out))
    inside = w == o or o in w.parents or w in o.parents  # the folder, a file in it, or a folder above it
    resume = "what is saved stays, so the same command resumes"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(
            f"no space left on device while writing {where}; free space ({resume}) or choose another --out"
        )
    if inside and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(
            f"cannot write {where} ({e.strerror}): {out} is read-only for you; make it writable or choose "
            "another --out"
        )
    if inside:
        return UserError(f"cannot write {where} ({e.strerror}); choose another --out ({resume})")
    return UserError(f"cannot read {where} ({e.strerror}); check the file and its permissions")


def _drop_if_unused(out: Path, created: bool) -> None:
    """Remove `out` again if this call created it and it holds nothing but the marker."""
    if created and {p.name for p in out.iterdir()} <= {MARKER}:
        (out / MARKER).unlink(missing_ok=True)
        out.rmdir()


def _clean(folder: Path) -> None:
    """Remove everything a previous run of prepare may have left (and nothing else)."""
    for pattern in (
        "train_*.bin*",
        "val_*.bin*",
        "train_*.mask*",
        "val_*.mask*",
        META,
        META + ".tmp",
        STATE,
        STATE + ".tmp",
    ):
        for p in folder.glob(pattern):
            p.unlink()


def _resumable(folder: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The saved progress of an unfinished run with the same settings whose listed shards are intact."""
    try:
        state = json.loads((folder / STATE).read_text())
        if state.get("settings") != settings:
            return None
        for rec in state["splits"].values():
            if sum(read_header(folder / s).n_tokens for s in rec["shards"]) != rec["tokens"]:
                return None
    except (OSError, json.JSONDecodeError, UserError, KeyError, TypeError, AttributeError):
        return None
    listed = {s for rec in state["splits"].values() for s in rec["shards"]}
    for p in [*folder.glob("train_*.bin*"), *folder.glob("val_*.bin*")]:
        if p.name not in listed:  # a .tmp of the interrupted shard, or a shard closed after the last save
            p.unlink()
    return state


def _settings_of(folder: Path) -> dict[str, Any]:
    try:
        settings = json.loads((folder / META).read_text())["source"]["settings"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return {}
    return settings if isinstance(settings, dict) else {}


@dataclass(frozen=True)
class PrepareResult:
    out_dir: Path
    status: str  # prepared | resumed | unchanged
    documents: dict[str, int]  # per split
    tokens: dict[str, int]  # per split, `<|endoftext|>` separators included
    shards: dict[str, list[str]]
    truncated: bool  # --max-tokens stopped the stream
    val_tail: int  # > 0: the source gave one document, and val is its last `val_tail` tokens
    seconds: float
    tokens_per_second: float  # tokens tokenized and written by this call, per second
    format: str = "nanogpt-tokens"  # or "chat" / "completions": conversations with loss masks
    skipped: int = 0  # bad records left out (--skip-bad)

    def summary(self) -> str:
        d, t = self.documents, self.tokens
        n_shards = sum(len(s) for s in self.shards.values())
        if self.format in CHAT_FORMATS:
            d = self.documents
            head = f"{self.out_dir}: {d['train'] + d['val']:,} conversations ({d['train']:,} train, {d['val']:,} val"
            head += f"; {self.skipped:,} bad records skipped), " if self.skipped else "), "
        elif self.val_tail:
            head = f"{self.out_dir}: 1 document (its last {self.val_tail:,} tokens held out for val), "
        else:
            n_docs = d["train"] + d["val"]
            head = f"{self.out_dir}: {n_docs:,} documents ({d['train']:,} train, {d['val']:,} val), "
        head += f"{t['train']:,} train + {t['val']:,} val tokens in {n_shards} shards"
        if self.status == "unchanged":
            return f"{head}; already prepared with these settings, nothing to do (--force rebuilds it)"
        cap = " (capped by --max-tokens)" if self.truncated else ""
        return f"{head}{cap}; {self.status} in {self.seconds:.1f} s ({self.tokens_per_second:,.0f} tokens/s)"


def _result(out: Path, status: str, seconds: float = 0.0, new_tokens: int = 0) -> PrepareResult:
    meta = TokenData(out).meta
    splits = meta["splits"]
    return PrepareResult(
        out_dir=out,
        status=status,
        documents={s: splits[s]["documents"] for s in SPLITS},
        tokens={s: splits[s]["tokens"] for s in SPLITS},
        shards={s: list(splits[s]["shards"]) for s in SPLITS},
        truncated=bool(meta["source"].get("truncated")),
        val_tail=int(meta["source"].get("val_tail", 0)),
        format=str(meta.get("format", "nanogpt-tokens")),
        skipped=int(meta["source"].get("skipped", 0)),
        seconds=seconds,
        tokens_per_second=new_tokens / seconds if seconds > 0 else 0.0,
    )


def prepare(
    source: str = BUILTIN,
    out_dir: str | Path | None = None,
    *,
    text_field: str = "text",
    split: str = "train",
    val_fraction: float = 0.05,
    seed: int = 1337,
    max_tokens: int | None = None,
    shard_tokens: int = 100_000_000,
    errors: str = "strict",
    force: bool = False,
    verbose: bool = True,
    train_on_prompt: bool = False,
    skip_bad: bool = False,
    context_length: int | None = None,
) -> PrepareResult:
    """Tokenize `source` into the data folder `out_dir` (default data/<name>); see the module docstring.

    A JSONL source of chat ({"messages"}) or completions ({"prompt", "completion"}) records becomes
    conversations with loss masks (`data.conversations`); `train_on_prompt`, `skip_bad` and
    `context_length` (default: the card's) apply to those only."""
    if not 0 < val_fraction <= 0.5:
        raise UserError(f"--val-fraction {val_fraction} is out of range; use a value in (0, 0.5], e.g. 0.05")
    if shard_tokens < 1 or (max_tokens is not None and max_tokens < 1):
        raise UserError("--shard-tokens and --max-tokens must be positive token counts, e.g. 100M and 10M")
    if errors not in ("strict", "replace"):
        raise UserError(f"--errors {errors!r} is not supported; use strict or replace")
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if verbose else (lambda msg: None)  # above the bar
    src = resolve_source(source)
    out = Path(out_dir) if out_dir is not None else default_out_dir(src)
    if out.is_file():
        raise UserError(f"--out {out} is a file; pass a folder for the data")
    settings = {
        "source": str(Path(src.spec)) if src.files else src.spec,
        "fingerprint": source_fingerprint(src),
        "text_field": text_field,
        "split": split,
        "val_fraction": val_fraction,
        "seed": seed,
        "max_tokens": max_tokens,
        "shard_tokens": shard_tokens,
        "errors": errors,
    }
    kind = data_format(src, errors, train_on_prompt=train_on_prompt, skip_bad=skip_bad)
    if (
        kind in CHAT_FORMATS
    ):  # only then: a plain folder's settings, and so its up-to-date check, stay as they were
        settings |= {"format": kind, "train_on_prompt": train_on_prompt, "skip_bad": skip_bad}
        settings["context_length"] = context_length or ModelConfig().context_length
    if (out / META).is_file() and not force and folder_purpose(out) == "data":
        old = _settings_of(out)
        if old == settings:
            return _result(out, "unchanged")
        diff = ", ".join(k for k in settings if old.get(k) != settings[k])
        raise UserError(
            f"{out} already holds data prepared with other settings (differing: {diff}); "
            "pass --force to rebuild it or choose another --out"
        )

    claim(out, "data", force=force)  # a folder of other files is refused (--force: its own files are kept)
    created = not out.exists()  # only a folder this call made may be removed again
    try:
        out.mkdir(parents=True, exist_ok=True)
        if (
            folder_purpose(out) != "data"
        ):  # from the first shard on: a killed preparation is continued as ours
            mark(out, "data")
        if kind in CHAT_FORMATS:
            return _prepare_chat(out, created, src, settings, verbose)
        return _prepare_into(out, created, src, settings, state_ok=not force, say=say, verbose=verbose)
    except OSError as e:
        raise _io_error(e, out) from None


def _prepare_into(
    out: Path,
    created: bool,
    src: Source,
    settings: dict[str, Any],
    *,
    state_ok: bool,
    say: Callable[[str], None],
    verbose: bool,
) -> PrepareResult:
    """prepare()'s work once `out` exists: resume or start, stream, write shards, then meta.json."""
    source, max_tokens, seed = settings["source"], settings["max_tokens"], settings["seed"]
    state = _resumable(out, settings) if state_ok else None
    if state is not None:
        say(f"{out}: resuming an unfinished preparation after {state['documents_done']:,} documents")
    elif any(out.glob("*.bin*")) or (out / STATE).exists() or (out / META).exists():
        say(f"{out}: discarding an earlier unfinished or different preparation, starting over")
        _clean(out)
    k = val_every(settings["val_fraction"])
    progress = _Progress(out, settings, state, get_tokenizer().vocab_size)
    start, t0 = progress.tokens, time.perf_counter()
    if not progress.finished:
        docs = iter_documents(src, settings["text_field"], errors=settings["errors"], split=settings["split"])
        room = None if max_tokens is None else max_tokens - start
        bar = tqdm(total=max_tokens, initial=start, unit="tok", unit_scale=True, desc="tokenizing",
                   file=sys.stderr, disable=not verbose, dynamic_ncols=True)  # fmt: skip
        # said once the bar is closed: a line written while it is drawn shares its line in a log file
        notes: list[str] = []
        try:
            for doc in _units(docs, progress, settings["val_fraction"], max_tokens, notes.append):
                if room is not None and doc.size - progress.offset >= room:
                    doc, progress.truncated = doc[: progress.offset + room], True
                room = None if room is None else room - (doc.size - progress.offset)
                bar.update(doc.size - progress.offset)
                split = "val" if is_val(seed, progress.documents, k) else "train"
                progress.add(doc, split, settings["shard_tokens"])
                if progress.truncated:
                    break
            progress.save(finished=True)
        except BaseException:
            progress.abort()
            _drop_if_unused(out, created)  # failed before anything was saved: leave no trace
            raise
        finally:
            bar.close()
            docs.close()
        for note in notes:
            say(note)
    seconds = time.perf_counter() - t0

    if progress.tokens == 0:
        _clean(out)
        _drop_if_unused(out, created)
        raise UserError(f"source {source} holds no documents (no non-empty text); check it and --text-field")
    records = progress.records()
    info: dict[str, Any] = {
        "source": src.spec,
        "description": describe(src, settings["split"]),
        "settings": settings,
    }
    info["val_every"] = k
    info["documents"] = {s: r["documents"] for s, r in records.items()}
    info["tokens"] = {s: r["tokens"] for s, r in records.items()}
    info["truncated"] = progress.truncated
    info["val_tail"] = progress.val_tail
    mark(out, "data")  # before meta.json: a folder that looks complete is always recognised as ours
    write_meta(out, records, info)
    (out / STATE).unlink(missing_ok=True)
    return _result(out, "resumed" if state else "prepared", seconds, progress.tokens - start)


def _prepare_chat(
    out: Path, created: bool, src: Source, settings: dict[str, Any], verbose: bool
) -> PrepareResult:
    """prepare()'s work for chat / completions data (`data.conversations`), from a clean folder."""
    _clean(out)
    k, t0 = val_every(settings["val_fraction"]), time.perf_counter()
    try:
        counts = write_conversations(
            out, src, settings, settings["format"], lambda i: is_val(settings["seed"], i, k)
        )
    except BaseException:
        _clean(out)
        _drop_if_unused(out, created)
        raise
    say_skipped(counts, verbose)
    mark(out, "data")
    seconds = time.perf_counter() - t0
    result = _result(out, "prepared", seconds)
    return replace(result, tokens_per_second=sum(result.tokens.values()) / max(seconds, 1e-9))
