"""Real text for tests, cut from the builtin Shakespeare corpus, and the JSONL files `prepare` reads.

texts = real_texts(10)              # 10 documents of ~600 characters
"""

from __future__ import annotations

import json
import lzma
from importlib.resources import files
from pathlib import Path


def builtin_works() -> list[dict]:
    """The builtin corpus, one {"text": ...} record per work."""
    raw = lzma.decompress((files("nanogpt") / "corpus" / "shakespeare.jsonl.xz").read_bytes())
    return [json.loads(line) for line in raw.decode("utf-8").splitlines()]


def real_texts(n: int = 120, size: int = 600) -> list[str]:
    """n real-text documents of about `size` characters, cut from the first work."""
    text = builtin_works()[0]["text"]
    return [text[i * size : (i + 1) * size] for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
