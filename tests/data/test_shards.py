import numpy as np
import pytest

from nanogpt.data.shards import HEADER, BatchSampler, TokenData, read_shard, write_shard
from nanogpt.errors import UserError


def test_shard_round_trip(tmp_path):
    toks = np.array([0, 1, 50256, 12345], dtype=np.int64)
    write_shard(tmp_path / "a.bin", toks, vocab_size=50257)
    assert read_shard(tmp_path / "a.bin").tolist() == toks.tolist()
    assert (tmp_path / "a.bin").stat().st_size == HEADER.size + 8


def test_shard_errors(tmp_path):
    (tmp_path / "bad.bin").write_bytes(b"NOTMAGIC" + bytes(40))
    with pytest.raises(UserError, match="wrong magic"):
        read_shard(tmp_path / "bad.bin")
    p = write_shard(tmp_path / "v.bin", [1, 2, 3], vocab_size=50257)
    raw = bytearray(p.read_bytes())
    raw[8] = 99  # version field
    p.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="format version 99"):
        read_shard(p)
    p = write_shard(tmp_path / "t.bin", [1, 2, 3], vocab_size=50257)
    p.write_bytes(p.read_bytes()[:-2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        read_shard(p)
    with pytest.raises(UserError, match="not found"):
        read_shard(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="out of range"):
        write_shard(tmp_path / "r.bin", [70000], vocab_size=50257)


def test_batches_seeded_and_resumable(small_data):
    data = TokenData(small_data)
    a = BatchSampler(data.split("train"), batch_size=3, context_length=16, seed=7)
    b = BatchSampler(data.split("train"), batch_size=3, context_length=16, seed=7)
    x, y = a.next()
    assert x.shape == y.shape == (3, 16)
    assert (x[:, 1:] == y[:, :-1]).all()
    assert (b.next()[0] == x).all()
    state = a.state()
    nxt = a.next()[0]
    b.load_state(state)
    assert (b.next()[0] == nxt).all()
    other_rank = BatchSampler(data.split("train"), batch_size=3, context_length=16, seed=7, rank=1)
    assert not (other_rank.next()[0] == x).all()


def test_token_data_errors(small_data, tmp_path):
    with pytest.raises(UserError, match="not found"):
        TokenData(tmp_path / "nowhere")
    with pytest.raises(UserError, match="meta.json"):
        TokenData(tmp_path)
    with pytest.raises(UserError, match="tokenized with"):
        TokenData(small_data, tokenizer="llama")
    with pytest.raises(UserError, match="no 'test' split"):
        TokenData(small_data).split("test")
    with pytest.raises(UserError, match="too few"):
        BatchSampler(TokenData(small_data).split("val"), batch_size=1, context_length=10**7, seed=0)
