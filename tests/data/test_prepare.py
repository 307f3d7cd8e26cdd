"""`nanogpt prepare`: sources, the held-out-by-document split, shards, caps, restarts and bad input."""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from nanogpt import cli
from nanogpt.commands.prepare import parse_count
from nanogpt.data import prepare as prep
from nanogpt.data import sources
from nanogpt.data.prepare import STATE, is_val, prepare, val_every
from nanogpt.data.shards import META, TokenData, read_shard
from nanogpt.data.sources import hf_documents, iter_documents
from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.errors import UserError, install_command
from tests.corpus import builtin_works, real_texts, write_jsonl

EOT = 50256


def split_docs(folder: Path, split: str) -> list[list[int]]:
    """A split's documents: its shards concatenated and cut after each `<|endoftext|>`."""
    shards = TokenData(folder).split(split)
    tokens = np.concatenate([np.asarray(s) for s in shards]) if shards else np.zeros(0, np.uint16)
    ends = np.flatnonzero(tokens == EOT) + 1
    return [t.tolist() for t in np.split(tokens, ends) if t.size]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("builtin") / "data"
    result = prepare(out_dir=out, verbose=False)
    assert result.status == "prepared"
    return out


# ---- the builtin corpus ------------------------------------------------------------------------------


def test_builtin_end_to_end_holds_out_whole_documents(builtin_dir):
    tok = get_tokenizer()
    works = [w["text"] for w in builtin_works()]
    expected = [ids + [EOT] for ids in tok.encode_batch(works)]
    data = TokenData(builtin_dir)
    train, val = split_docs(builtin_dir, "train"), split_docs(builtin_dir, "val")
    assert data.num_tokens("train") + data.num_tokens("val") == sum(map(len, expected))
    assert data.meta["splits"]["val"]["documents"] == len(val) >= 1
    assert len(train) + len(val) == len(works) == 42
    # every stored document is one whole work, each work lands in exactly one split, in corpus order
    index = {tuple(d): i for i, d in enumerate(expected)}
    train_ids, val_ids = [index[tuple(d)] for d in train], [index[tuple(d)] for d in val]
    assert sorted(train_ids + val_ids) == list(range(42))
    assert train_ids == sorted(train_ids) and val_ids == sorted(val_ids)
    src = data.meta["source"]
    assert src["source"] == "builtin" and src["settings"]["seed"] == 1337 and src["val_every"] == 20
    assert src["tokens"]["val"] == data.num_tokens("val") and src["documents"]["train"] == len(train)
    assert not (builtin_dir / STATE).exists()


def test_builtin_is_deterministic(builtin_dir, tmp_path):
    prepare(out_dir=tmp_path / "again", verbose=False)
    assert folder_bytes(tmp_path / "again") == folder_bytes(builtin_dir)
    prepare(out_dir=tmp_path / "seed2", seed=2, verbose=False)
    assert split_docs(tmp_path / "seed2", "val") != split_docs(builtin_dir, "val")


def test_max_tokens_caps_the_total(tmp_path):
    r = prepare(out_dir=tmp_path / "cap", max_tokens=100_000, verbose=False)
    assert r.truncated and sum(r.tokens.values()) == 100_000
    assert "capped by --max-tokens" in r.summary()
    assert r.documents["val"] >= 1
    data = TokenData(tmp_path / "cap")
    assert sum(len(s) for s in data.split("train") + data.split("val")) == 100_000


def test_small_shards_keep_the_token_stream(builtin_dir, tmp_path):
    r = prepare(out_dir=tmp_path / "sharded", shard_tokens=200_000, verbose=False)
    data = TokenData(tmp_path / "sharded")
    train, val = [len(s) for s in data.split("train")], [len(s) for s in data.split("val")]
    assert len(train) == 8 and all(n == 200_000 for n in train[:-1]) and 0 < train[-1] <= 200_000
    assert sum(train) == r.tokens["train"] and sum(val) == r.tokens["val"] and max(val) <= 200_000
    for split in ("train", "val"):  # sharding moves no document to the other split
        assert split_docs(tmp_path / "sharded", split) == split_docs(builtin_dir, split)
    assert data.meta["splits"]["val"]["documents"] == len(split_docs(builtin_dir, "val"))


# ---- the split -------------------------------------------------------------------------------------


def test_val_every():
    assert val_every(0.05) == 20 and val_every(0.1) == 10 and val_every(0.3) == 3 and val_every(0.5) == 2


def test_is_val_holds_out_one_per_block_stably_and_never_leaves_val_empty():
    k = 20
    val = [i for i in range(40_000) if is_val(1337, i, k)]
    assert val == [i for i in range(40_000) if is_val(1337, i, k)]  # stable
    assert len(val) == 2000 and {i // k for i in val} == set(range(2000))  # exactly one in each block
    assert val[0] == 1  # the first block's is its second document: a lone document stays in train
    positions = np.bincount([i % k for i in val[1:]], minlength=k)
    assert positions.min() > 0 and positions.max() < 2 * 2000 / k  # spread over the block
    assert val != [i for i in range(40_000) if is_val(7, i, k)]
    assert not any(is_val(seed, 0, k) for seed in range(100))
    assert all(is_val(seed, 1, k) for seed in range(100))  # every corpus of >= 2 documents holds one out


# ---- sources -------------------------------------------------------------------------------------------


def test_text_file_source(tmp_path, capsys):
    text = builtin_works()[1]["text"][:5000]
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    r = prepare(str(tmp_path / "book.txt"), tmp_path / "out", verbose=True)
    ids = get_tokenizer().encode(text) + [EOT]
    assert len(ids) > 2 * prep.WINDOW and r.val_tail == prep.WINDOW  # 5% of the tokens is under a window
    assert r.documents == {"train": 1, "val": 1} and r.tokens == {
        "train": len(ids) - r.val_tail,
        "val": r.val_tail,
    }
    # one document, cut in two: train is its head, val its tail (nothing lost, nothing repeated)
    data = TokenData(tmp_path / "out")
    assert np.concatenate([*data.split("train"), *data.split("val")]).tolist() == ids
    assert TokenData(tmp_path / "out").meta["source"]["val_tail"] == r.val_tail
    err = capsys.readouterr().err
    assert "one document, so its last 513 of" in err and "held out as the val split" in err
    assert "last 513 tokens held out for val" in r.summary()
    assert sources.default_out_dir(sources.resolve_source(str(tmp_path / "book.txt"))) == Path("data/book")


def test_jsonl_and_gzip_sources(tmp_path):
    rows = [{"text": "first doc"}, {"text": None}, {"text": "   "}, {"text": "second doc", "id": 2}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n" + json.dumps({"body": "gz doc"}) + "\n\n")
    assert list(iter_documents(str(tmp_path / "a.jsonl"))) == ["first doc", "second doc"]
    assert list(iter_documents(str(tmp_path / "b.jsonl.gz"), "body")) == ["gz doc"]
    r = prepare(str(tmp_path / "a.jsonl"), tmp_path / "out", verbose=False)
    assert r.documents["train"] + r.documents["val"] == 2 and r.documents["val"] == 1


def test_parquet_source_reads_every_row_group(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = real_texts(10)
    pq.write_table(pa.table({"id": list(range(10)), "text": texts}), tmp_path / "x.parquet", row_group_size=3)
    assert pq.ParquetFile(tmp_path / "x.parquet").num_row_groups == 4
    assert list(iter_documents(str(tmp_path / "x.parquet"))) == texts
    r = prepare(str(tmp_path / "x.parquet"), tmp_path / "out", val_fraction=0.2, verbose=False)
    assert r.documents == {"train": 8, "val": 2}
    assert sum(r.tokens.values()) == sum(len(ids) + 1 for ids in get_tokenizer().encode_batch(texts))


def test_folder_source_is_recursive_and_sorted(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("text file b", encoding="utf-8")
    write_jsonl(root / "sub" / "a.jsonl", [{"text": "jsonl 1"}, {"text": "jsonl 2"}])
    pq.write_table(pa.table({"text": ["parquet 1", "parquet 2"]}), root / "c.parquet")
    (root / "notes.csv").write_text("ignored,file\n")
    assert list(iter_documents(str(root))) == ["text file b", "parquet 1", "parquet 2", "jsonl 1", "jsonl 2"]
    r = prepare(str(root), tmp_path / "out", verbose=False)
    assert r.documents["train"] + r.documents["val"] == 5
    assert TokenData(tmp_path / "out").meta["source"]["description"] == f"3 files under {root}"


def test_hf_streaming_path_matches_the_local_parquet_reader(tmp_path):
    pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = real_texts(7)
    pq.write_table(pa.table({"text": texts, "url": ["u"] * 7}), tmp_path / "x.parquet", row_group_size=2)
    streamed = list(hf_documents("parquet", data_files=str(tmp_path / "x.parquet")))
    assert streamed == list(iter_documents(str(tmp_path / "x.parquet"))) == texts
    with pytest.raises(UserError, match=r"no 'content' field \(it has: text, url\)"):
        list(hf_documents("parquet", data_files=str(tmp_path / "x.parquet"), text_field="content"))


def test_hf_source_reads_a_save_to_disk_folder(tmp_path):
    """`hf:PATH` on a folder `save_to_disk` wrote (which `load_dataset` refuses): a DatasetDict or one Dataset."""
    datasets = pytest.importorskip("datasets")
    texts = real_texts(12)
    train = datasets.Dataset.from_dict({"text": texts[:10], "url": ["u"] * 10})
    val = datasets.Dataset.from_dict({"text": texts[10:], "url": ["v"] * 2})
    datasets.DatasetDict({"train": train, "validation": val}).save_to_disk(str(tmp_path / "dd"))
    train.save_to_disk(str(tmp_path / "one"))
    assert list(hf_documents(str(tmp_path / "dd"))) == texts[:10]
    assert list(hf_documents(str(tmp_path / "dd"), split="validation")) == texts[10:]
    assert list(hf_documents(str(tmp_path / "one"))) == texts[:10]

    # the command's path: every saved document lands in the data folder, whole
    r = prepare(f"hf:{tmp_path / 'dd'}", tmp_path / "out", verbose=False)
    assert r.documents["train"] + r.documents["val"] == 10 and r.documents["val"] >= 1
    stored = split_docs(tmp_path / "out", "train") + split_docs(tmp_path / "out", "val")
    want = [ids + [EOT] for ids in get_tokenizer().encode_batch(texts[:10])]
    assert sorted(stored) == sorted(want)
    assert "save_to_disk" in TokenData(tmp_path / "out").meta["source"]["description"]

    dd = f"hf:{tmp_path / 'dd'}"
    one_line_error(
        r"has no split 'test' \(it has: train, validation\); pass --split", dd, tmp_path / "o2", split="test"
    )
    one_line_error(
        r"no 'body' column \(it has: text, url\); pass --text-field", dd, tmp_path / "o3", text_field="body"
    )
    one_line_error("save_to_disk folder, which has no configs; drop :sample", f"{dd}:sample", tmp_path / "o4")
    datasets.Dataset.from_dict({"text": texts[10:]}, split="validation").save_to_disk(
        str(tmp_path / "val_only")
    )
    one_line_error(
        "holds the validation split only; pass --split validation",
        f"hf:{tmp_path / 'val_only'}",
        tmp_path / "o5",
    )


# ---- re-runs and restarts ----------------------------------------------------------------------------


def test_rerun_is_a_noop_and_other_settings_need_force(corpus, tmp_path):
    out = tmp_path / "out"
    first = prepare(str(corpus), out, val_fraction=0.1, verbose=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare(str(corpus), out, val_fraction=0.1, verbose=False)
    assert again.status == "unchanged" and again.tokens == first.tokens
    assert "nothing to do" in again.summary()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(UserError, match="other settings \\(differing: val_fraction\\).*--force"):
        prepare(str(corpus), out, val_fraction=0.2, verbose=False)
    forced = prepare(str(corpus), out, val_fraction=0.2, force=True, verbose=False)
    assert forced.status == "prepared" and forced.documents["val"] == 24


def test_restart_after_interruption_resumes_and_matches_an_uninterrupted_run(corpus, tmp_path, monkeypatch):
    settings = {"val_fraction": 0.1, "shard_tokens": 2000, "verbose": False}
    monkeypatch.setattr(prep, "BATCH_DOCS", 10)
    reference = prepare(str(corpus), tmp_path / "ref", **settings)
    assert len(reference.shards["train"]) >= 5

    tok, real_encode, calls = get_tokenizer(), get_tokenizer().encode_batch, []

    def interrupted(texts, num_threads=None):  # Ctrl-C during the 7th tokenizer batch
        calls.append(len(texts))
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_encode(texts, num_threads)

    monkeypatch.setattr(tok, "encode_batch", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(str(corpus), out, **settings)
    assert not (out / META).exists() and (out / STATE).exists()
    assert not list(out.glob("*.tmp"))
    with pytest.raises(UserError, match="did not finish"):
        TokenData(out)
    state = json.loads((out / STATE).read_text())
    done = state["documents_done"]
    assert 0 < done < 60 and state["offset"] > 0  # the last saved shard ended inside a document
    (out / "train_00042.bin.tmp").write_bytes(b"half a shard")  # what a hard kill leaves behind

    calls.clear()
    monkeypatch.setattr(
        tok, "encode_batch", lambda texts, num_threads=None: calls.append(len(texts)) or real_encode(texts)
    )
    resumed = prepare(str(corpus), out, **settings)
    assert resumed.status == "resumed"
    assert sum(calls) == 120 - done  # the finished documents were skipped, not re-tokenized
    assert folder_bytes(out) == folder_bytes(tmp_path / "ref")


def test_folder_without_meta_starts_over(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    prepare(str(corpus), out, verbose=False)
    reference = folder_bytes(out)
    (out / META).unlink()
    (out / "val_00001.bin.tmp").write_bytes(b"junk")
    r = prepare(str(corpus), out, verbose=True)
    assert r.status == "prepared" and "starting over" in capsys.readouterr().err
    assert folder_bytes(out) == reference


# ---- bad input -------------------------------------------------------------------------------------


def one_line_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as e:
        prepare(*args, verbose=False, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_and_unknown_sources(tmp_path):
    one_line_error("not found", str(tmp_path / "nope.txt"), tmp_path / "out")
    one_line_error("unknown source 's3://bucket/x'", "s3://bucket/x", tmp_path / "out")
    (tmp_path / "table.csv").write_text("a,b\n")
    one_line_error("unknown source file type .*table.csv", str(tmp_path / "table.csv"), tmp_path / "out")
    (tmp_path / "empty_dir").mkdir()
    one_line_error("holds no .*files", str(tmp_path / "empty_dir"), tmp_path / "out")
    one_line_error("names no dataset", "hf:", tmp_path / "out")
    one_line_error("--val-fraction 0.9 is out of range", "builtin", tmp_path / "out", val_fraction=0.9)


def test_empty_corpus(tmp_path):
    write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": "\n\n"}])
    one_line_error("blank.jsonl holds no documents", str(tmp_path / "blank.jsonl"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_utf8_text_and_jsonl(tmp_path):
    (tmp_path / "latin.txt").write_bytes(b"hello\ncaf\xe9 au lait\n")
    msg = one_line_error("not valid UTF-8", str(tmp_path / "latin.txt"), tmp_path / "out")
    assert "latin.txt:2:" in msg and "byte offset 9" in msg and "--errors replace" in msg
    # a one-document source this short is refused for its size (see tests/bad_input/test_data.py), not its bytes
    assert list(iter_documents(str(tmp_path / "latin.txt"), errors="replace")) == [
        "hello\ncaf\ufffd au lait\n"
    ]
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    msg = one_line_error("not valid UTF-8", str(tmp_path / "bad.jsonl"), tmp_path / "out2")
    assert "bad.jsonl:2:" in msg and "byte offset 25" in msg
    (tmp_path / "bom.txt").write_bytes(
        b"\xef\xbb\xbfline one\nbad \xff"
    )  # a UTF-8 BOM is dropped, not counted
    msg = one_line_error("not valid UTF-8", str(tmp_path / "bom.txt"), tmp_path / "out3")
    assert "bom.txt:2:" in msg and "byte offset 16" in msg
    assert list(iter_documents(str(tmp_path / "bom.txt"), errors="replace")) == ["line one\nbad \ufffd"]


def test_bad_jsonl_lines(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    one_line_error(r"x.jsonl:2: not valid JSON", str(tmp_path / "x.jsonl"), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a failed run leaves no half-made folder behind
    write_jsonl(tmp_path / "y.jsonl", [{"body": "no text field", "id": 1}])
    one_line_error(
        r"y.jsonl:1: no 'text' field \(it has: body, id\)", str(tmp_path / "y.jsonl"), tmp_path / "o"
    )
    write_jsonl(tmp_path / "z.jsonl", [{"text": 42}])
    one_line_error(r"z.jsonl:1: field 'text' is int", str(tmp_path / "z.jsonl"), tmp_path / "o")
    (tmp_path / "l.jsonl").write_text('["a list"]\n')
    one_line_error(r"l.jsonl:1: expected a JSON object", str(tmp_path / "l.jsonl"), tmp_path / "o")


def test_bad_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "x.parquet")
    one_line_error(
        r"x.parquet has no 'text' column \(it has: body, id\)", str(tmp_path / "x.parquet"), tmp_path / "o"
    )
    one_line_error(r"column 'id' holds int64", str(tmp_path / "x.parquet"), tmp_path / "o", text_field="id")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    one_line_error("not a readable Parquet file", str(tmp_path / "junk.parquet"), tmp_path / "o")


def test_missing_optional_packages(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    (tmp_path / "x.parquet").write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    one_line_error(re.escape(install_command("data")), str(tmp_path / "x.parquet"), tmp_path / "o")
    monkeypatch.setitem(sys.modules, "datasets", None)
    one_line_error(
        r"`datasets` package.*" + re.escape(install_command("data")),
        "hf:HuggingFaceFW/fineweb-edu",
        tmp_path / "o",
    )


# ---- command line ------------------------------------------------------------------------------------


def test_parse_count():
    assert parse_count("10M") == 10_000_000 and parse_count("1.5k") == 1500
    assert parse_count("100_000") == 100_000 and parse_count("1e7") == 10_000_000
    for bad in ("ten", "0", "1.5", "-3M"):
        with pytest.raises(Exception, match="token count"):
            parse_count(bad)


def test_cli(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["prepare", "--source", str(corpus), "--out", str(out), "--val-fraction", "0.1", "--quiet"]
    assert cli.main(argv + ["--shard-tokens", "5K", "--max-tokens", "20k"]) == 0
    summary = capsys.readouterr().out.strip()
    assert summary.startswith(f"{out}: ") and "documents" in summary and "capped by --max-tokens" in summary
    data = TokenData(out)
    assert data.num_tokens("train") + data.num_tokens("val") == 20_000
    assert [read_shard(out / s).size for s in data.meta["splits"]["train"]["shards"]][:3] == [5000] * 3
    assert cli.main(argv + ["--shard-tokens", "5K", "--max-tokens", "20k"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cli.main(["prepare", "--source", str(tmp_path / "missing.jsonl"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanogpt prepare: error:") and "missing.jsonl not found" in err and "\n" not in err


def test_a_literal_separator_in_a_document_is_text_not_a_document_boundary(tmp_path):
    """docs/data.md: `<|endoftext|>` typed in a document is 7 ordinary tokens; the only 50256 is the separator."""
    texts = real_texts(3)
    texts[1] = texts[1][:300] + " <|endoftext|> " + texts[1][300:]
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    prepare(str(src), tmp_path / "out", verbose=False)
    stored = split_docs(tmp_path / "out", "train") + split_docs(tmp_path / "out", "val")
    assert sorted(stored) == sorted(ids + [EOT] for ids in get_tokenizer().encode_batch(texts))
    assert len(stored) == 3 and all(d.count(EOT) == 1 for d in stored)
