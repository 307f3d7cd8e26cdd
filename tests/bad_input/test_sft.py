"""The bad-input catalogue of fine-tuning data (#29): chat / completions JSONL in `prepare`, and the chat
folders `train` reads.

Each case is one refusal (see tests/bad_input/__init__.py): exit 2, one stderr line naming the problem (for a
record: its file and line) and the fix, no traceback, the source unchanged and no data folder left behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nanogpt.data.prepare import prepare
from tests.bad_input import refuse
from tests.bad_input.test_data import train_argv

SFT = Path(__file__).parent.parent / "data" / "sft"
GOOD = [json.loads(line) for line in (SFT / "chat.jsonl").read_text(encoding="utf-8").splitlines()[:4]]
USER = {"role": "user", "content": "Hi"}
REPLY = {"role": "assistant", "content": "Hello"}


def _source(tmp_path: Path, bad: object, name: str = "sft.jsonl") -> Path:
    """A JSONL file of two good records, then `bad` on line 3, then two more good ones."""
    path = tmp_path / name
    rows = [GOOD[0], GOOD[1], bad, GOOD[2], GOOD[3]]
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _refuse_prepare(capsys, tmp_path, bad, names, fix, *flags: str) -> None:
    src, out = _source(tmp_path, bad), tmp_path / "out"
    names = [f"{src}:3", *([names] if isinstance(names, str) else names)]
    refuse(capsys, ["prepare", "--source", str(src), "--out", str(out), "--quiet", *flags],
           names=names, fix=fix, untouched=[src])  # fmt: skip
    assert not out.exists(), "a refused preparation left a folder behind"


@pytest.mark.parametrize(
    "bad,names,fix",
    [
        ({"messages": [{"content": "Hi"}, REPLY]}, "message 0 has no 'role'", "give each message one of"),
        ({"messages": [{"role": "robot", "content": "Hi"}, REPLY]}, "role 'robot'", "use one of system"),
        ({"messages": [{"role": "user", "content": ["Hi"]}, REPLY]}, "'content' is list", "must be text"),
        ({"messages": [USER, {"role": "assistant"}]}, "'content' is missing", "must be text"),
        ({"messages": [{"role": "system", "content": "Be brief."}, USER]}, "no assistant turn", "nothing would"),
        ({"messages": []}, "'messages' must be a non-empty list", "role"),
        ({"messages": [USER, "Hello"]}, "message 1 is str", "object"),
        ({"messages": [USER, {"role": "assistant", "content": "a<|endoftext|>b"}]}, "holds <|endoftext|>",
         "remove it"),
        ({"prompt": "Hi", "completion": "Hello"}, "a completions record in chat data", "same format"),
        ({"messages": [USER, {"role": "assistant", "content": "word " * 600}]}, "longer than the context",
         ["--context-length", "--skip-bad"]),
    ],
)  # fmt: skip
def test_prepare_refuses_a_malformed_chat_record(capsys, tmp_path, bad, names, fix):
    _refuse_prepare(capsys, tmp_path, bad, names, fix)


def test_prepare_refuses_a_malformed_completions_record(capsys, tmp_path):
    src, out = tmp_path / "c.jsonl", tmp_path / "out"
    src.write_text('{"prompt": "Hi", "completion": "Hello"}\n{"prompt": "Hi", "completion": 3}\n')
    refuse(capsys, ["prepare", "--source", str(src), "--out", str(out), "--quiet"],
           names=[f"{src}:2", "'completion' is int"], fix='{"prompt": str, "completion": str}', untouched=[src])  # fmt: skip
    assert not out.exists()


def test_prepare_refuses_a_too_long_conversation_for_the_given_context(capsys, tmp_path):
    _refuse_prepare(capsys, tmp_path, {"messages": [USER, {"role": "assistant", "content": "word " * 80}]},
                    "longer than the context (64 + 1)", "--skip-bad", "--context-length", "64")  # fmt: skip


def test_prepare_refuses_one_conversation(capsys, tmp_path):
    src, out = tmp_path / "one.jsonl", tmp_path / "out"
    src.write_text(json.dumps(GOOD[0]) + "\n")
    refuse(capsys, ["prepare", "--source", str(src), "--out", str(out), "--quiet"],
           names="1 usable conversation", fix="at least 2 records", untouched=[src])  # fmt: skip
    assert not out.exists()


def test_prepare_skip_bad_still_needs_two_conversations(capsys, tmp_path):
    src, out = tmp_path / "bad.jsonl", tmp_path / "out"
    src.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps({"messages": [USER]}) + "\n")
    refuse(capsys, ["prepare", "--source", str(src), "--out", str(out), "--quiet", "--skip-bad"],
           names=["1 skipped as bad", f"{src}:2"], fix="at least 2 records", untouched=[src])  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--train-on-prompt", "--skip-bad"])
def test_chat_flags_refused_for_text_data(capsys, tmp_path, flag):
    src, out = tmp_path / "t.jsonl", tmp_path / "out"
    src.write_text('{"text": "Some plain text."}\n{"text": "More."}\n')
    refuse(capsys, ["prepare", "--source", str(src), "--out", str(out), "--quiet", flag],
           names=[flag, "read as plain text"], fix=f"drop {flag}", untouched=[src])  # fmt: skip
    assert not out.exists()


def test_prepare_refuses_a_nonpositive_context_length(capsys, tmp_path):
    refuse(capsys, ["prepare", "--source", str(SFT / "chat.jsonl"), "--out", str(tmp_path / "o"),
                    "--context-length", "0"], names="--context-length 0", fix="--context-length 512")  # fmt: skip


# ---- train on a chat folder ----------------------------------------------------------------------------


@pytest.fixture
def chat_data(tmp_path) -> Path:
    out = tmp_path / "chat"
    prepare(str(SFT / "chat.jsonl"), out, val_fraction=0.2, verbose=False)
    return out


def test_train_refuses_conversations_longer_than_the_model_context(capsys, tmp_path, chat_data):
    argv = train_argv(tmp_path, chat_data)
    config = Path(argv[argv.index("--config") + 1])
    config.write_text(json.dumps(json.loads(config.read_text()) | {"context_length": 16}))
    refuse(capsys, argv, names=["tokens", "does not fit context_length 16"], fix="--context-length 16",
           untouched=[chat_data])  # fmt: skip


def test_train_refuses_a_chat_folder_without_its_masks(capsys, tmp_path, chat_data):
    broken = Path(shutil.copytree(chat_data, tmp_path / "broken"))
    (broken / "train_00000.mask").unlink()
    refuse(capsys, train_argv(tmp_path, broken), names="train_00000.mask not found",
           fix="nanogpt prepare --force", untouched=[broken])  # fmt: skip


# ---- sample --chat ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,names,fix",
    [
        (["--chat", "Hi", "--num-samples", "2"], "--num-samples applies to --prompt", "drop it"),
        (
            ["--system", "Be brief.", "--prompt", "Hi"],
            "--system is the system message of a --chat",
            "add --chat",
        ),
        (["--chat", "Hi", "--prompt", "Hi"], "--prompt: not allowed with argument --chat", "--help"),
    ],
)
def test_sample_chat_flags(capsys, argv, names, fix):
    refuse(capsys, ["sample", "--preset", "tiny", *argv], names=names, fix=fix)
