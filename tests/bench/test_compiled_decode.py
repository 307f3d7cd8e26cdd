"""`nanogpt bench --compiled-decode`: eager and compiled decode rows, the compile time apart (tiny model).

Timings here are only checked for being measured (positive, consistent), never for their size: the rows'
figures are for an idle machine (docs/benchmarks.md, "Compiled decode").
"""

from __future__ import annotations

import json

from nanogpt import cli


def test_compiled_decode_rows(ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["bench", "--model", str(ckpt), "--compiled-decode", "--repeats", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "compiled_decode.json").read_text())
    assert (out / "compiled_decode.md").read_text() == printed
    assert res["new_tokens"] == 56 and res["repeats"] == 2  # the tiny context (64) minus the 8-token prompt
    tps = res["tokens_per_s"]
    for k in ("eager", "compiled"):
        assert 0 < tps[k]["min"] <= tps[k]["median"] <= tps[k]["max"]
    assert res["compiled_over_eager"] == tps["compiled"]["median"] / tps["eager"]["median"]
    assert res["compile"]["seconds"] > 0 and res["compile"]["inductor_cache"] in ("hit", "miss")
    assert res["graphs_recompiled"] == 0  # every timed run, each with its own cache, reused the one graph
    even = res["break_even_tokens"]
    assert (even is None) == (res["compiled_over_eager"] <= 1)
    assert "| eager |" in printed and "| compiled |" in printed and "compilation (first step)" in printed
