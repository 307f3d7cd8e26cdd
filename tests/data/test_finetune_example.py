"""The data half of scripts/finetune_example.py (no teacher here): speeches parsed from corpus text,
instructions drawn from a few builtin snippets with a fixed seed, and chat JSONL that `prepare` accepts
whole, masked, in the tiny preset's 128-token context the example trains in."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

from nanogpt.data.chat import record_kind, record_messages
from nanogpt.data.prepare import prepare
from nanogpt.data.shards import TRAINED, TokenData, read_mask

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "finetune_example.py"

SCENE = """ROMEO.
But soft, what light through yonder window breaks?
It is the east, and Juliet is the sun.

[Enter Nurse.]

JULIET.
O Romeo, Romeo! wherefore art thou Romeo?

NURSE.
Madam!

FIRST WATCH.
Come, sirs, we have a charge: keep the peace here."""


@functools.cache
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("finetune_example", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_speeches_are_speaker_and_verse_lines():
    found = script().speeches("Romeo and Juliet", SCENE)
    # the stage direction is no speech; "Madam!" is too short a line to quote
    assert [(s.speaker, len(s.lines)) for s in found] == [("Romeo", 2), ("Juliet", 1), ("First Watch", 1)]
    assert found[0].lines[1] == "It is the east, and Juliet is the sun."


def test_instructions_from_builtin_snippets_become_chat_data_prepare_accepts(tmp_path):
    fx = script()
    snippets = fx.corpus_speeches()[:80]
    items = fx.make_instructions(snippets, 12, seed=0)
    assert [it["kind"] for it in items] == list(fx.KINDS) * 3
    assert items == fx.make_instructions(snippets, 12, seed=0)  # the seed fixes the draw
    assert items != fx.make_instructions(snippets, 12, seed=1)
    who = next(it["user"] for it in items if it["kind"] == "who")
    assert who.startswith('Who speaks the line "') and who.count("\n") == 2
    # replies stand in for the teacher's: one cut at its token limit, one empty (left out)
    replies: list[str | None] = [f"Reply {i}. It ends here." for i in range(len(items))]
    replies[0], replies[1] = "A whole sentence. And a cut", None
    path = tmp_path / "sft.jsonl"
    assert fx.write_chat_jsonl(items, replies, path) == len(items) - 1
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for i, row in enumerate(rows, 1):
        messages = record_messages(row, record_kind(row), f"{path}:{i}")
        assert [m["role"] for m in messages] == ["user", "assistant"]
    assert rows[0]["messages"][1]["content"] == "A whole sentence."

    result = prepare(str(path), tmp_path / "sft", val_fraction=0.1, verbose=False, context_length=128)
    assert result.skipped == 0 and sum(result.documents.values()) == len(rows)
    data = TokenData(tmp_path / "sft")
    assert data.is_chat
    shard = data.split("train")[0]
    mask = read_mask(tmp_path / "sft" / data.meta["splits"]["train"]["shards"][0], len(shard))
    assert 0 < int((mask & TRAINED).astype(bool).sum()) < len(shard)  # replies trained, prompts not
