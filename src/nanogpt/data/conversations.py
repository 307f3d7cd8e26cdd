"""Prepare chat or completions JSONL (mlx-lm's formats) -> token shards with loss masks (`nanogpt prepare`).

Each record becomes one conversation through the chat template (`data.chat`): its ids go to `X.bin`, and
its mask to `X.mask` (`data.shards`: bit 0 = a trained target, bit 1 = the conversation's first token).
A `{"prompt", "completion"}` record is the conversation user: prompt, assistant: completion (as mlx-lm
renders it with a chat template). A conversation is never cut: one longer than --context-length + 1 tokens,
like any malformed record, stops the run with its file and line, or with `skip_bad` is left out and
counted. A shard never splits a conversation; the val split holds whole conversations (the same
one-in-k rule as plain documents, `prepare.is_val`), at least one. There is no resume: chat sets are
small, and an interrupted run (no meta.json) starts over.

    prepare("chat.jsonl", "data/chat")  # via nanogpt.data.prepare.prepare, which dispatches here
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nanogpt.data.chat import encode_chat, record_kind, record_messages
from nanogpt.data.shards import STARTS, TRAINED, MaskWriter, ShardWriter, mask_path, write_meta
from nanogpt.data.sources import Source, describe, first_record, records
from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.errors import UserError

SPLITS = ("train", "val")


class _MaskedShards:
    """One split's token shards and their masks; a conversation that would overflow a shard opens the next."""

    def __init__(self, folder: Path, split: str, shard_tokens: int) -> None:
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.shards: list[str] = []
        self.tokens = self.documents = 0
        self._w: tuple[ShardWriter, MaskWriter] | None = None

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        if self._w is not None and self._w[0].n_tokens + ids.size > self.shard_tokens:
            self.close()
        if self._w is None:
            path = self.folder / f"{self.split}_{len(self.shards):05d}.bin"
            self._w = (ShardWriter(path, get_tokenizer().vocab_size), MaskWriter(mask_path(path)))
        self._w[0].write(ids)
        self._w[1].write(mask)
        self.tokens, self.documents = self.tokens + ids.size, self.documents + 1

    def close(self) -> None:
        if self._w is not None:
            self._w[1].close()
            self.shards.append(self._w[0].close().name)
            self._w = None

    def abort(self) -> None:
        if self._w is not None:
            for w in self._w:
                w.abort()
            self._w = None

    def record(self) -> dict[str, Any]:
        return {"shards": list(self.shards), "tokens": self.tokens, "documents": self.documents}


def conversation_arrays(
    row: Any, kind: str, where: str, *, train_on_prompt: bool, context_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """One record's (ids uint16, mask uint8) arrays; a malformed or too long record raises a UserError."""
    enc = encode_chat(record_messages(row, kind, where), train_on_prompt=train_on_prompt)
    if len(enc.ids) > context_length + 1:
        raise UserError(
            f"{where}: the conversation is {len(enc.ids)} tokens, longer than the context ({context_length} "
            f"+ 1); shorten it, pass a larger --context-length, or --skip-bad to leave such records out"
        )
    mask = np.asarray(enc.mask, dtype=np.uint8) * TRAINED
    mask[0] |= STARTS
    return np.asarray(enc.ids, dtype=np.uint16), mask


@dataclass
class ChatCounts:
    kept: int = 0
    skipped: int = 0
    first_skip: str = ""  # the first skipped record's reason, for the summary
    truncated: bool = False  # --max-tokens stopped the stream


def write_conversations(
    out: Path, src: Source, settings: dict[str, Any], kind: str, is_val: Callable[[int], bool]
) -> ChatCounts:
    """Stream the records of `src` into `out`'s shards and masks, then write meta.json (format `kind`)."""
    splits = {s: _MaskedShards(out, s, settings["shard_tokens"]) for s in SPLITS}
    counts, max_tokens, written = ChatCounts(), settings["max_tokens"], 0
    try:
        for where, row in records(src, settings["errors"]):
            try:
                if record_kind(row) != kind:
                    raise UserError(
                        f"{where}: a {record_kind(row)} record in {kind} data; every line of a file must have "
                        "the same format"
                    )
                ids, mask = conversation_arrays(
                    row,
                    kind,
                    where,
                    train_on_prompt=settings["train_on_prompt"],
                    context_length=settings["context_length"],
                )
            except UserError as e:
                if not settings["skip_bad"]:
                    raise
                counts.skipped += 1
                counts.first_skip = counts.first_skip or str(e)
                continue
            if max_tokens is not None and written + ids.size > max_tokens:
                counts.truncated = True
                break  # --max-tokens stops before a conversation, never inside one
            splits["val" if is_val(counts.kept) else "train"].add(ids, mask)
            counts.kept, written = counts.kept + 1, written + ids.size
        for w in splits.values():
            w.close()
    except BaseException:
        for w in splits.values():
            w.abort()
        raise
    _check_splits(src, splits, counts)
    info: dict[str, Any] = {"source": src.spec, "description": describe(src), "settings": settings}
    info |= {"documents": {s: w.documents for s, w in splits.items()}, "skipped": counts.skipped}
    info |= {"tokens": {s: w.tokens for s, w in splits.items()}, "truncated": counts.truncated, "val_tail": 0}
    write_meta(out, {s: w.record() for s, w in splits.items()}, info, fmt=kind)
    return counts


def _check_splits(src: Source, splits: dict[str, _MaskedShards], counts: ChatCounts) -> None:
    """Both splits need a conversation: refuse a set too small to hold one out."""
    if splits["train"].documents and splits["val"].documents:
        return
    skipped = f" ({counts.skipped} skipped as bad: the first, {counts.first_skip})" if counts.skipped else ""
    raise UserError(
        f"{src.spec} gives {counts.kept} usable conversation(s){skipped}; train and val need one each, so "
        "give at least 2 records"
    )


def say_skipped(counts: ChatCounts, verbose: bool) -> None:
    if verbose and counts.skipped:
        print(f"note: skipped {counts.skipped} bad record(s) (--skip-bad); the first: {counts.first_skip}",
              file=sys.stderr)  # fmt: skip


def data_format(src: Source, errors: str, *, train_on_prompt: bool, skip_bad: bool) -> str:
    """ "chat" or "completions" when the source's first JSONL record is one, else "text"; the chat-only
    flags are refused for text (they would silently do nothing)."""
    kind = record_kind(first_record(src, errors))
    if kind == "text" and (train_on_prompt or skip_bad):
        flag = "--train-on-prompt" if train_on_prompt else "--skip-bad"
        raise UserError(
            f'{flag} applies to chat or completions JSONL ({{"messages": [...]}} or {{"prompt", '
            f'"completion"}} records); {src.spec} is read as plain text, so drop {flag}'
        )
    return kind
