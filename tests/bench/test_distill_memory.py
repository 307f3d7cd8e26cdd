"""`bench --distill-memory`: the peak memory of real `train` and `distill` processes, side by side."""

from __future__ import annotations

import json

import pytest

from nanogpt.cli import main


@pytest.mark.slow
def test_distill_memory_row_measures_both_commands(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--distill-memory", "--preset", "tiny", "--batch", "2", "--seq", "64", "--threads", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads((out / "distill_memory.json").read_text())
    train, distill = result["train_peak_bytes"], result["distill_peak_bytes"]
    assert train > 100 << 20 and distill > 100 << 20  # whole processes: torch alone is more than 100 MiB
    assert result["ratio"] == distill / train and result["met"] == (result["ratio"] <= 1.3)
    assert (result["batch"], result["seq"], result["steps"]) == (2, 64, 3)
    row = (out / "distill_memory.md").read_text()
    assert "3 steps at 2 x 64" in row and f"{result['ratio']:.2f}x" in row and row in capsys.readouterr().out


@pytest.mark.slow
def test_the_row_in_mlx_runs_both_commands_in_mlx(tmp_path):
    pytest.importorskip("mlx.core")
    out = tmp_path / "bench"
    argv = ["bench", "--distill-memory", "--preset", "tiny", "--batch", "2", "--seq", "32", "--threads", "1"]
    assert main([*argv, "--backend", "mlx", "--repeats", "2", "--out", str(out)]) == 0
    result = json.loads((out / "distill_memory.json").read_text())
    assert result["backend"] == "mlx" and result["steps"] == 2 and "mlx" in result["method"]
    assert (
        result["train_peak_bytes"] > 100 << 20
        and result["ratio"] == result["distill_peak_bytes"] / result["train_peak_bytes"]
    )
    assert "mlx, 2 steps at 2 x 32" in (out / "distill_memory.md").read_text()
