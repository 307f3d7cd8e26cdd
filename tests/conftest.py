"""Shared fixtures: the tiny model (config, seeded weights, checkpoint), real text, and a small data folder.

Plain constants and functions live in modules named for what they hold: `tests/tiny.py` (the tiny config,
the quick training recipe), `tests/corpus.py` (real text), `tests/card.py` (the model card's figures),
`tests/local_server.py` (HTTP on 127.0.0.1), `tests/bad_input/__init__.py` (the refusal check).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nanogpt.config import ModelConfig
from nanogpt.data.shards import ShardWriter, write_meta
from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import save_model
from tests.corpus import builtin_works, real_texts, write_jsonl
from tests.tiny import tiny_config


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    """2 layers, width 32, context 64: the size of every parity test."""
    return tiny_config()


@pytest.fixture
def model(tiny_cfg) -> NanoGPTLMHeadModel:
    """The tiny model, seeded, in eval mode."""
    torch.manual_seed(0)
    return NanoGPTLMHeadModel(tiny_cfg).eval()


@pytest.fixture
def ckpt(model, tmp_path) -> Path:
    """`model` saved as a checkpoint folder."""
    return save_model(tmp_path / "ckpt", model)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """An untrained tiny checkpoint with a 16-token context, to distill into from a served teacher."""
    torch.manual_seed(11)
    return save_model(
        tmp_path_factory.mktemp("student") / "s", NanoGPTLMHeadModel(tiny_config(context_length=16))
    )


@pytest.fixture
def corpus(tmp_path) -> Path:
    """120 real-text documents of ~600 characters (~18K tokens) as JSONL."""
    return write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in real_texts(120)])


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
