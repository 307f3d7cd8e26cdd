"""The bad-input catalogue of the data path: `prepare`, the data `train` reads, and `import`.

Each case is one refusal (see tests/bad_input/__init__.py): exit 2, one stderr line naming the problem and the fix,
no traceback, the files the command was pointed at unchanged. Disks that are full or read-only are real
where the test may mount a small tmpfs (root) or chmod stops writes (not root); elsewhere the write seam
`data.WRITE_FAULT_ENV` makes the same OSError at the same place.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nanogpt import cli
from nanogpt.commands.import_ import main as import_main
from nanogpt.data import shards as data_mod
from nanogpt.data.prepare import STATE, WINDOW
from nanogpt.data.shards import HEADER, META, TokenData, write_meta
from nanogpt.export import hf
from nanogpt.model.gpt import NanoGPTLMHeadModel
from tests.bad_input import mount_tmpfs, refuse, refuse_subprocess
from tests.bad_input import small_disk as disk
from tests.corpus import builtin_works
from tests.tiny import TINY_MODEL, tiny_config

QUIET = ["--quiet"]


# ---- prepare: sources and flags ------------------------------------------------------------------------


def test_prepare_source_missing(capsys, tmp_path):
    refuse(capsys, ["prepare", "--source", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"), *QUIET],
           names=["nope.txt", "not found"], fix="pass an existing file or folder")  # fmt: skip
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
def test_prepare_empty_source(capsys, tmp_path, name):
    (tmp_path / name).write_text("" if name.endswith(".txt") else '{"text": ""}\n\n')
    out = tmp_path / "o"
    refuse(capsys, ["prepare", "--source", str(tmp_path / name), "--out", str(out), *QUIET],
           names=[name, "holds no documents"], fix="--text-field", untouched=[tmp_path / name])  # fmt: skip
    assert not out.exists()  # nothing left behind


def test_prepare_jsonl_line_not_json(capsys, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n')
    refuse(capsys, ["prepare", "--source", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "o"), *QUIET],
           names=["c.jsonl:2", "not valid JSON"], fix="each line must be one JSON object")  # fmt: skip


def test_prepare_jsonl_line_lacks_text_field(capsys, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"body": "other field"}\n')
    refuse(capsys, ["prepare", "--source", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "o"), *QUIET],
           names=["c.jsonl:2", "no 'text' field", "body"], fix="--text-field")  # fmt: skip


def test_prepare_parquet_without_the_column(capsys, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["a document"]}), tmp_path / "c.parquet")
    refuse(capsys, ["prepare", "--source", str(tmp_path / "c.parquet"), "--out", str(tmp_path / "o"), *QUIET],
           names=["c.parquet", "no 'text' column", "content"], fix="--text-field")  # fmt: skip


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "lots", "inf", "nan"])
@pytest.mark.parametrize("flag", ["--max-tokens", "--shard-tokens"])
def test_prepare_token_count_flag_nonsense(capsys, tmp_path, flag, value):
    refuse(capsys, ["prepare", flag, value, "--out", str(tmp_path / "o"), *QUIET],
           names=[flag, repr(value)], fix="such as 10M")  # fmt: skip
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["0", "0.9", "-0.1", "nan", "inf"])
def test_prepare_val_fraction_out_of_range(capsys, tmp_path, value):
    refuse(capsys, ["prepare", "--val-fraction", value, "--out", str(tmp_path / "o"), *QUIET],
           names=["--val-fraction", "out of range"], fix="(0, 0.5]")  # fmt: skip


def test_prepare_out_is_a_file(capsys, tmp_path, corpus):
    (tmp_path / "o").write_text("my notes")
    refuse(capsys, ["prepare", "--source", str(corpus), "--out", str(tmp_path / "o"), *QUIET],
           names=["--out", "is a file"], fix="pass a folder", untouched=[tmp_path / "o"])  # fmt: skip


def test_prepare_out_below_a_file(capsys, tmp_path, corpus):
    (tmp_path / "notes").write_text("my notes")
    refuse(capsys, ["prepare", "--source", str(corpus), "--out", str(tmp_path / "notes" / "data"), *QUIET],
           names=["notes", "cannot write"], fix="another --out", untouched=[tmp_path / "notes"])  # fmt: skip


# ---- prepare: the val split is never empty ---------------------------------------------------------------


def test_prepare_one_txt_file_gets_a_nonempty_val_split(capsys, tmp_path):
    """Not a refusal: the case that used to write an empty val split (and break the next train)."""
    text = builtin_works()[3]["text"][:20_000]
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    assert cli.main(["prepare", "--source", str(tmp_path / "book.txt"), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    data = TokenData(tmp_path / "o")
    n_val, n_train = data.num_tokens("val"), data.num_tokens("train")
    assert n_val >= WINDOW and n_train >= WINDOW and data.meta["source"]["val_tail"] == n_val
    assert n_val == max(WINDOW, -(-(n_val + n_train) * 5 // 100))  # max(5%, one window)
    assert f"its last {n_val:,} of {n_val + n_train:,} tokens are held out as the val split" in err
    assert sum(len(s) for s in data.split("val")) == n_val


def test_prepare_single_document_shorter_than_two_windows(capsys, tmp_path):
    (tmp_path / "tiny.txt").write_text("To be, or not to be, that is the question.\n" * 20)  # ~260 tokens
    refuse(capsys, ["prepare", "--source", str(tmp_path / "tiny.txt"), "--out", str(tmp_path / "o"), *QUIET],
           names=["single document of", "too few to hold out a val split"],
           fix=[f"at least {2 * WINDOW} tokens", "several documents"],
           untouched=[tmp_path / "tiny.txt"])  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_prepare_max_tokens_inside_the_first_document_too_small(capsys, tmp_path):
    out = tmp_path / "o"
    refuse(capsys, ["prepare", "--max-tokens", "600", "--out", str(out), *QUIET],
           names=["--max-tokens 600", "inside the first document"],
           fix=f"--max-tokens {2 * WINDOW}")  # fmt: skip
    assert not out.exists()


# ---- prepare: read-only and full disks -------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path | None]:
    """A 40 KiB tmpfs (None where none can be mounted: the test then uses the write seam)."""
    with disk(tmp_path / "disk", "40k") as where:
        yield where


def test_prepare_full_disk_refuses_then_resumes(capsys, tmp_path, corpus, small_disk, monkeypatch):
    settings = ["--source", str(corpus), "--shard-tokens", "1000", "--val-fraction", "0.1", *QUIET]
    assert cli.main(["prepare", *settings, "--out", str(tmp_path / "ref")]) == 0  # ~18 4-KiB pages of shards
    if small_disk is None:
        out = tmp_path / "data"
        monkeypatch.setenv(data_mod.WRITE_FAULT_ENV, "ENOSPC:20000")
        monkeypatch.setattr(data_mod, "_written", [0])
    else:
        out = small_disk / "data"
    line = refuse(capsys, ["prepare", *settings, "--out", str(out)],
                  names=["no space left on device while writing", str(out)],
                  fix=["free space", "another --out"], untouched=[corpus])  # fmt: skip
    # restartable: complete shards and the state that lists them stay, no half-written shard
    assert (out / STATE).is_file() and not (out / META).exists() and not list(out.glob("*.bin.tmp"))
    assert list(out.glob("train_*.bin")), line
    if small_disk is None:
        monkeypatch.delenv(data_mod.WRITE_FAULT_ENV)
    else:
        subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True, timeout=10)
    assert cli.main(["prepare", *settings, "--out", str(out)]) == 0
    assert "resumed" in capsys.readouterr().out
    ref = {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()}
    assert {p.name: p.read_bytes() for p in out.iterdir()} == ref


@pytest.fixture
def read_only_parent(tmp_path) -> Iterator[tuple[Path, bool]]:
    """A folder holding a user's file that this process cannot write in: (folder, real).

    Not root: chmod 0o555 stops writes. Root ignores the mode bits, so a read-only tmpfs is mounted there
    instead (its file written first, then remounted ro). real=False: neither works, the test uses the seam.
    """
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        (parent / "probe").touch()
    except PermissionError:
        yield parent, True
        parent.chmod(0o755)
        return
    (parent / "probe").unlink()
    parent.chmod(0o755)
    mounted = mount_tmpfs(parent, "size=16k")
    (parent / "keep.txt").write_text("the user's file")
    if mounted:
        mounted = subprocess.run(["mount", "-o", "remount,ro", str(parent)], timeout=10).returncode == 0
    yield parent, mounted
    if mounted:
        subprocess.run(["umount", str(parent)], capture_output=True, timeout=10)


def test_prepare_into_a_read_only_folder(capsys, tmp_path, corpus, read_only_parent, monkeypatch):
    parent, real = read_only_parent
    if not real:
        monkeypatch.setenv(data_mod.WRITE_FAULT_ENV, "EROFS:0")
        monkeypatch.setattr(data_mod, "_written", [0])
    out = parent / "data"
    refuse(capsys, ["prepare", "--source", str(corpus), "--out", str(out), *QUIET],
           names=["cannot write", str(out)], fix=["make it writable", "another --out"],
           untouched=[parent, corpus])  # fmt: skip
    assert not out.exists()


# ---- train: the data folder and its shards ---------------------------------------------------------------

TINY_RUN = {
    "device": "cpu",
    "batch_size": 2,
    "max_iters": 2,
    "eval_interval": 1,
    "eval_iters": 1,
    "warmup_iters": 0,
}


def train_argv(tmp_path: Path, data: Path) -> list[str]:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_MODEL | TINY_RUN))
    return ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--config", str(config),
            "--no-progress"]  # fmt: skip


@pytest.fixture
def data_copy(small_data, tmp_path) -> Path:
    """A private copy of the small real data folder, to break."""
    return Path(shutil.copytree(small_data, tmp_path / "data"))


def test_train_data_is_a_file(capsys, tmp_path, data_copy):
    meta = data_copy / META
    refuse(capsys, train_argv(tmp_path, meta), names=["meta.json is a file", "not a prepared data folder"],
           fix="pass the folder", untouched=[data_copy])  # fmt: skip


def test_train_val_split_with_zero_tokens(capsys, tmp_path, data_copy):
    """What prepare wrote for a single .txt file before it held out a tail."""
    meta = json.loads((data_copy / META).read_text())
    (data_copy / "val_00000.bin").unlink()
    splits = meta["splits"] | {"val": {"shards": [], "tokens": 0, "documents": 0}}
    write_meta(data_copy, splits, meta["source"])
    refuse(capsys, train_argv(tmp_path, data_copy), names=["'val' split", "is empty"],
           fix=["nanogpt prepare", "--force", "--val-fraction"], untouched=[data_copy])  # fmt: skip


def test_train_val_split_shorter_than_a_window(capsys, tmp_path, data_copy):
    meta = json.loads((data_copy / META).read_text())
    data_mod.write_shard(data_copy / "val_00000.bin", list(range(10)), vocab_size=50257)
    write_meta(data_copy, meta["splits"] | {"val": {"shards": ["val_00000.bin"], "tokens": 10}}, {})
    refuse(capsys, train_argv(tmp_path, data_copy), names=["val_00000.bin", "10 tokens", "window of 65"],
           fix=["larger --val-fraction", "smaller context_length"], untouched=[data_copy])  # fmt: skip


def test_train_token_ids_past_the_vocabulary(capsys, tmp_path, data_copy):
    """A shard whose header is valid but whose ids are not GPT-2's: an IndexError traceback before."""
    shard = data_copy / "train_00000.bin"
    raw = bytearray(shard.read_bytes())
    body = np.frombuffer(raw, dtype="<u2", offset=HEADER.size).copy()
    body[:] = 60000 + body % 5000  # every window is past the 50,257-token vocabulary
    shard.write_bytes(bytes(raw[: HEADER.size]) + body.tobytes())
    refuse(capsys, train_argv(tmp_path, data_copy), names=[str(shard), "past the vocabulary (50257)"],
           fix="re-run `nanogpt prepare --force`", untouched=[data_copy])  # fmt: skip


def test_train_shard_truncated_mid_file(capsys, tmp_path, data_copy):
    shard = data_copy / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    refuse(capsys, train_argv(tmp_path, data_copy), names=[str(shard), "truncated or corrupt"],
           fix="nanogpt prepare", untouched=[data_copy])  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "names"),
    [
        ("magic", b"GGUFGGUF", "wrong magic"),
        ("version", 7, "format version 7"),
        ("itemsize", 4, "4-byte tokens"),
    ],
)
def test_train_shard_header_of_another_format(capsys, tmp_path, data_copy, field, value, names):
    shard = data_copy / "train_00000.bin"
    raw = shard.read_bytes()
    header = dict(
        zip(["magic", "version", "itemsize", "n", "vocab", "reserved"], HEADER.unpack(raw[:32]), strict=True)
    )
    header[field] = value
    shard.write_bytes(HEADER.pack(*header.values()) + raw[HEADER.size :])
    refuse(capsys, train_argv(tmp_path, data_copy), names=[str(shard), names], fix="nanogpt prepare",
           untouched=[data_copy])  # fmt: skip


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('{"version": 1, "tokenizer": "gpt2", "vocab', "not JSON"),
        ("[1, 2, 3]", "holds a JSON list"),
        ('{"version": 1, "tokenizer": "gpt2", "vocab_size": 50257}', "lacks a valid 'splits'"),
        (
            '{"version": 1, "tokenizer": "gpt2", "vocab_size": 50257, "splits": {"train": {"shards": "x"}}}',
            "lacks a valid 'splits'",
        ),
    ],
    ids=["not_json", "a_list", "no_splits", "splits_malformed"],
)
def test_train_meta_json_broken(capsys, tmp_path, data_copy, text, names):
    (data_copy / META).write_text(text)
    refuse(capsys, train_argv(tmp_path, data_copy), names=["meta.json", names],
           fix="nanogpt prepare --out", untouched=[data_copy])  # fmt: skip


# ---- import: config.json and weights ---------------------------------------------------------------------


@pytest.fixture
def gpt2_folder(tmp_path) -> Path:
    """A real GPT-2-format HF folder (config.json + model.safetensors) of a 2-layer, width-32 model."""
    cfg = tiny_config(vocab_size=50257)
    torch.manual_seed(0)
    sd = {k: v for k, v in NanoGPTLMHeadModel(cfg).state_dict().items() if k != "lm_head.weight"}
    folder = tmp_path / "gpt2"
    folder.mkdir()
    save_file(hf.to_gpt2_state(sd), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf.gpt2_config(cfg)))
    return folder


def test_import_control_the_folder_imports(tmp_path, gpt2_folder):
    """The fixture itself is good: each case below breaks one thing of an importable folder."""
    assert import_main(["--hf", str(gpt2_folder), "--out", str(tmp_path / "ok")]) == 0


def edit_config(folder: Path, **changes) -> None:
    conf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(conf | changes))


def import_argv(folder: Path, tmp_path: Path) -> list[str]:
    return ["import", "--hf", str(folder), "--out", str(tmp_path / "imported")]


def test_import_config_is_a_json_list(capsys, tmp_path, gpt2_folder):
    (gpt2_folder / "config.json").write_text("[1, 2]")
    refuse(capsys, import_argv(gpt2_folder, tmp_path), names=["config.json", "holds a JSON list"],
           fix="download or export it again", untouched=[gpt2_folder])  # fmt: skip


def test_import_config_not_json(capsys, tmp_path, gpt2_folder):
    (gpt2_folder / "config.json").write_bytes(b'{"model_type": "gpt2", \xff')
    refuse(capsys, import_argv(gpt2_folder, tmp_path), names=["config.json", "not valid JSON"],
           fix="download or export it again", untouched=[gpt2_folder])  # fmt: skip


def test_import_config_without_model_type(capsys, tmp_path, gpt2_folder):
    conf = json.loads((gpt2_folder / "config.json").read_text())
    del conf["model_type"]
    (gpt2_folder / "config.json").write_text(json.dumps(conf))
    line = refuse(capsys, import_argv(gpt2_folder, tmp_path), names=["config.json", "has no model_type"],
                  fix="add the right model_type", untouched=[gpt2_folder])  # fmt: skip
    assert "None" not in line


@pytest.mark.parametrize(
    ("key", "value", "names"),
    [
        ("n_embd", "768", "n_embd is '768', not a positive whole number"),
        ("n_layer", -2, "n_layer is -2"),
        ("n_head", 0, "n_head is 0"),
        ("n_positions", float("inf"), "n_positions is inf"),
        ("n_embd", 32.0, "n_embd is 32.0"),
        ("layer_norm_epsilon", float("nan"), "layer_norm_epsilon is nan, not a finite number"),
        ("vocab_size", [50257], "vocab_size is [50257]"),
        ("tie_word_embeddings", "yes", "tie_word_embeddings is 'yes', not a bool"),
    ],
    ids=["string_size", "negative", "zero", "inf", "float_size", "nan_eps", "list", "string_bool"],
)
def test_import_config_bad_values(capsys, tmp_path, gpt2_folder, key, value, names):
    edit_config(gpt2_folder, **{key: value})
    refuse(capsys, import_argv(gpt2_folder, tmp_path), names=["config.json", names],
           fix="fix that value", untouched=[gpt2_folder])  # fmt: skip


def test_import_nanogpt_config_with_a_string_size(capsys, tmp_path, gpt2_folder):
    (gpt2_folder / "config.json").write_text(
        json.dumps({"model_type": "nanogpt", **TINY_MODEL, "d_model": "32"})
    )
    refuse(capsys, import_argv(gpt2_folder, tmp_path), names=["d_model is '32'"], fix="fix that value",
           untouched=[gpt2_folder])  # fmt: skip


def test_import_config_larger_than_its_weights(capsys, tmp_path, gpt2_folder):
    """n_layer 100000 used to build the model (~1.3 TB) before comparing shapes; now nothing is built."""
    edit_config(gpt2_folder, n_layer=100_000, n_embd=4096, n_head=32, n_inner=None)
    refuse(capsys, import_argv(gpt2_folder, tmp_path), names=["says 100000 layers", "hold 2"],
           fix="download or export it again", untouched=[gpt2_folder])  # fmt: skip


def test_import_config_wider_than_its_weights(capsys, tmp_path, gpt2_folder):
    edit_config(gpt2_folder, n_embd=4096, n_head=32, n_inner=None)  # built on the meta device only
    refuse(capsys, import_argv(gpt2_folder, tmp_path), names=["do not match config.json", "shape"],
           fix="mismatched", untouched=[gpt2_folder])  # fmt: skip


def test_import_truncated_safetensors(capsys, tmp_path, gpt2_folder):
    st = gpt2_folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size * 2 // 3])
    refuse(capsys, import_argv(gpt2_folder, tmp_path), names=["model.safetensors", "corrupt or truncated"],
           fix="download or export it again", untouched=[gpt2_folder])  # fmt: skip


@pytest.mark.parametrize(
    "payload",
    [{"transformer.wte.weight": [1.0, 2.0]}, [torch.zeros(2)], "weights"],
    ids=["dict", "list", "str"],
)
def test_import_bin_of_non_tensors(capsys, tmp_path, gpt2_folder, payload):
    (gpt2_folder / "model.safetensors").unlink()
    torch.save(payload, gpt2_folder / "pytorch_model.bin")
    names = ["pytorch_model.bin", "not a state dict of tensors"]
    refuse(capsys, import_argv(gpt2_folder, tmp_path), names=names,
           fix="download or export the model again", untouched=[gpt2_folder])  # fmt: skip


class _Payload:
    """Code a pickle runs when loaded: what weights_only refuses (torch.load stops before running it)."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_import_bin_that_is_a_plain_pickle_says_only_one_line(tmp_path, gpt2_folder):
    """A pytorch_model.bin written by pickle (protocol 4, not torch.save) used to print torch's two-line
    UserWarning about the protocol before the refusal: the refusal is the only line (a fresh process, so
    that Python's own warning printer, not pytest's, would show it)."""
    import pickle

    (gpt2_folder / "model.safetensors").unlink()
    with open(gpt2_folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": _Payload()}, f, protocol=4)
    names = ["pytorch_model.bin", "cannot be read as plain tensors"]
    refuse_subprocess(import_argv(gpt2_folder, tmp_path), names=names, fix="use a safetensors copy",
                      untouched=[gpt2_folder])  # fmt: skip


def test_write_seam_raises_the_errno_it_is_told(tmp_path, monkeypatch):
    """The seam the disk tests fall back on fails like a real disk: after its byte budget, with that errno."""
    monkeypatch.setenv(data_mod.WRITE_FAULT_ENV, "ENOSPC:100")
    monkeypatch.setattr(data_mod, "_written", [0])
    w = data_mod.ShardWriter(tmp_path / "s.bin", 50257)
    w.write(np.arange(30))  # 32 + 60 bytes: under the budget
    with pytest.raises(OSError) as e:
        w.write(np.arange(30))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "s.bin.tmp")
    w.abort()
    assert not list(tmp_path.iterdir())  # the half-written shard is gone
    monkeypatch.setenv(data_mod.WRITE_FAULT_ENV, "EROFS:0")  # fails at the header: nothing to abort() yet
    with pytest.raises(OSError, match="Read-only file system"):
        data_mod.ShardWriter(tmp_path / "t.bin", 50257)
    assert not list(tmp_path.iterdir())
