"""Shared fixtures: a tiny model config and a small real data folder built from the builtin corpus."""

from __future__ import annotations

import json
import lzma
from importlib.resources import files
from pathlib import Path

import pytest

from nanogpt.config import ModelConfig
from nanogpt.data.shards import ShardWriter, write_meta
from nanogpt.data.tokenizer import get_tokenizer


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    """2 layers, width 32: the size of every parity test."""
    return ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=128, context_length=64, dropout=0.0)


def builtin_works() -> list[dict]:
    raw = lzma.decompress((files("nanogpt") / "corpus" / "shakespeare.jsonl.xz").read_bytes())
    return [json.loads(line) for line in raw.decode("utf-8").splitlines()]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A data folder with two works for train and one for val (~110K tokens), written shard by shard."""
    out = tmp_path_factory.mktemp("small_data")
    tok = get_tokenizer()
    works = builtin_works()
    splits = {}
    for split, docs in (("train", works[:2]), ("val", works[2:3])):
        w = ShardWriter(out / f"{split}_00000.bin", vocab_size=tok.vocab_size)
        for ids in tok.encode_batch([d["text"] for d in docs]):
            w.write(ids + [tok.eot_id])
        w.close()
        splits[split] = {"shards": [f"{split}_00000.bin"], "tokens": w.n_tokens, "documents": len(docs)}
    write_meta(out, splits, {"kind": "test"})
    return out
