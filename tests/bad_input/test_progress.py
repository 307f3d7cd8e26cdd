"""No long silences and honest figures: what a long command shows while it works, and what its plots say.

Progress bars go to stderr (tqdm writes to the stream it is given: here pytest's capture), hidden by
`--no-progress`; the lines that report results go to stdout with or without a bar. The plots are checked on
the data they are drawn from (`loss_plot`, `bench_bars`), the names a reader sees.

New names are imported inside the tests, so that on a commit without them each test fails on its own.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

from nanogpt import cli
from nanogpt.config import TrainConfig
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import save_model
from nanogpt.train.plot import read_log
from tests.tiny import tiny_config

CONTEXT = 32
RECIPE = dict(batch_size=2, max_iters=2, eval_interval=2, eval_iters=3, log_interval=1, warmup_iters=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_model(tmp_path_factory.mktemp("progress") / "ckpt", NanoGPTLMHeadModel(tiny_config()))


@pytest.fixture
def text(tmp_path) -> Path:
    p = tmp_path / "held_out.txt"
    p.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 30)
    return p


def lines(stream: str) -> list[str]:
    """What a log file of `stream` shows as lines: tqdm's carriage returns do not start a line there."""
    return stream.split("\n")


# --- eval ---------------------------------------------------------------------------------------------------


def test_eval_shows_a_progress_bar_on_stderr(capsys, ckpt, text):
    """`nanogpt eval` printed nothing for minutes when stderr was not a terminal; now it draws the training
    bar's way: on stderr whenever progress is on, and `--no-progress` turns it off."""
    argv = ["eval", "--model", str(ckpt), "--text", str(text), "--context", "16", "--batch-size", "2"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    n = int(re.search(r"tokens scored: (\d+)", out).group(1))
    assert re.search(rf"eval: 100%.*\b{n}/{n} \[", err), err  # the bar reached every scored token
    assert "eval:" not in out  # the result on stdout stays clean
    assert cli.main([*argv, "--no-progress", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and json.loads(out)["tokens_scored"] == n


# --- training: the val lines and the evaluation's progress, both backends -------------------------------------


def _train(backend: str, progress: bool, data: Path, out: Path) -> None:
    cfg, model_cfg = TrainConfig(**RECIPE, device="cpu"), tiny_config(context_length=CONTEXT)
    if backend == "mlx":
        pytest.importorskip("mlx.core")
        from nanogpt.mlx.train.loop import train
    else:
        from nanogpt.train.loop import train
    train(model_cfg, cfg, data, out, progress=progress)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_no_progress_still_prints_the_val_lines(capsys, small_data, tmp_path, backend):
    """`--no-progress` hid the `step N: val loss` lines (they went through the bar's writer)."""
    _train(backend, False, small_data, tmp_path / "run")
    out, err = capsys.readouterr()
    assert re.search(r"^step 0: val loss \d+\.\d{4}, ppl ", out, re.M), out
    assert re.search(r"^step 2: val loss \d+\.\d{4}, ppl ", out, re.M), out
    assert "it/s" not in err and "evaluating" not in err  # and no bar


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_step_zero_evaluation_shows_its_progress(capsys, small_data, tmp_path, backend):
    """The step-0 evaluation (minutes on the card's presets) sat under a bar that did not move."""
    _train(backend, True, small_data, tmp_path / "run")
    out, err = capsys.readouterr()
    assert re.search(r"train( \(mlx\))? \(evaluating 0/3 batches\)", err), err
    # the val lines go to stdout, not inside the bar on stderr
    assert "step 0: val loss" in out and "val loss" not in err


# --- demo: the held-out perplexity step ------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_perplexity_step_shows_progress(capsys, tmp_path, monkeypatch):
    """The demo's held-out perplexity step (two evaluations, 2-3 minutes) printed nothing while it ran."""
    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--iters", "1", "--eval-tokens", "300", "--out", "runs/demo", "--no-export"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    # two bars from 0 to all 299 scored tokens: at initialisation and after training
    assert len(re.findall(r"eval: +0%.* 0/299 ", err)) == 2, err
    assert len(re.findall(r"eval: 100%.* 299/299 ", err)) >= 2, err


# --- distill: its bar and its plot -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, small_data) -> tuple[Path, str]:
    """A 3-step distillation of one tiny model into another (its progress on), and its stderr."""
    root = tmp_path_factory.mktemp("kd")
    cfg = tiny_config(context_length=CONTEXT)
    for name, seed in (("teacher", 1), ("student", 2)):
        torch.manual_seed(seed)
        save_model(root / name, NanoGPTLMHeadModel(cfg))
    argv = ["distill", "--teacher", str(root / "teacher"), "--student", str(root / "student")]
    argv += ["--data", str(small_data), "--out", str(root / "kd"), "--max-iters", "3", "--batch-size", "2"]
    argv += ["--eval-interval", "3", "--eval-iters", "1", "--log-interval", "1", "--device", "cpu"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # the bar's stream (a module fixture cannot use capsys)
        assert cli.main(argv) == 0
    return root, err.getvalue()


def test_distill_bar_says_distill(distilled):
    _, err = distilled
    assert re.search(r"distill: +100%", err), err
    assert "train:" not in err


def test_distill_plot_shows_the_hard_part_beside_the_held_out_ce(distilled):
    """loss.png drew alpha*CE + (1-alpha)*KL labelled "cross-entropy loss" beside the held-out CE, which read
    as heavy overfitting: the run now logs its hard part (`train_ce`), and the plot compares that with val."""
    root, _ = distilled
    records = read_log(root / "kd" / "log.jsonl")
    hard = [json.loads(x) for x in (root / "kd.teacher" / "distill_log.jsonl").read_text().splitlines()]
    for r in (r for r in records if r["step"] > 0):
        assert "train_ce" in r, r
        this_step = [h["hard"] for h in hard if h["step"] == r["step"]]
        assert r["train_ce"] == pytest.approx(sum(this_step) / len(this_step))  # the data CE of that step
        assert r["loss"] != pytest.approx(r["train_ce"])  # the mixture is another number
    from nanogpt.train.plot import loss_plot

    plot = loss_plot(records, "kd")
    labels = {c.label: c for c in plot.curves}
    assert set(labels) == {
        "train CE on the data (the hard part)",
        "val CE (held out)",
        "distillation loss: α·hard + (1−α)·soft (minimised)",
    }
    train_ce = labels["train CE on the data (the hard part)"]
    assert train_ce.values == [r["train_ce"] for r in records if r["step"]]
    assert "distillation" in plot.title and "cross-entropy" not in plot.ylabel  # not every curve is a CE
    assert (root / "kd" / "loss.png").stat().st_size > 0


def test_plain_run_plot_keeps_its_labels(small_data, tmp_path):
    from nanogpt.train.loop import train
    from nanogpt.train.plot import loss_plot

    train(tiny_config(context_length=CONTEXT), TrainConfig(**RECIPE, device="cpu"), small_data, tmp_path / "r",
          progress=False)  # fmt: skip
    records = read_log(tmp_path / "r" / "log.jsonl")
    assert not any("train_ce" in r for r in records)  # a plain run's loss is the data CE itself
    plot = loss_plot(records, "r")
    assert [c.label for c in plot.curves] == ["train", "val"] and plot.ylabel.startswith("cross-entropy")


# --- prepare: a note while the tokenizer's bar is drawn -------------------------------------------------------


def test_prepare_note_is_not_inside_the_tokenizer_bar(capsys, tmp_path):
    """A one-document source makes prepare say how it holds out val; said while the bar was drawn, the note
    shared the bar's line in a log (tqdm clears it with a carriage return, which a file keeps)."""
    src = tmp_path / "one.txt"
    src.write_text("Some words in one long document, and nothing else at all. " * 300)
    assert cli.main(["prepare", "--source", str(src), "--out", str(tmp_path / "d")]) == 0
    err = capsys.readouterr().err
    notes = [line for line in lines(err) if "note:" in line]
    assert len(notes) == 1 and notes[0].startswith("note: the source is one document"), err
    assert "tokenizing" in err.split("note:")[0]  # the bar came first, and was closed before the note


# --- bench: bench.png and the serving report ------------------------------------------------------------------


def _bench_result():
    from nanogpt.bench.measure import Row, Stat, rate_row, time_row
    from nanogpt.bench.run import BenchResult

    rows = [
        rate_row("train_tokens_per_s", "Training throughput: fwd + bwd", 1000, "tokens/s", Stat.of([1.0]), Stat.of([2.0])),
        time_row("ttft_s", "Time to first token: 64-token prompt", Stat.of([0.54]), Stat.of([0.1])),
        Row("activation_mib", "Activation memory, measured", 50.0, "MiB", peer=100.0, higher_is_better=False),
        Row("params_unique", "Model size: unique parameters", 10.0, "params", peer=10.0),
    ]  # fmt: skip
    settings = {"backend": "torch", "dtype": "fp32", "batch": 2, "seq": 64}
    return BenchResult(config={}, settings=settings, machine={"cpu": "test cpu"}, roofline={}, rows=rows)


def test_bench_plot_orients_every_bar_so_that_right_is_better(tmp_path):
    """bench.png put higher- and lower-is-better rows on one axis under their JSON keys, so a 5.4x slower time
    to first token read like a win."""
    from nanogpt.bench.run import bench_plot, plot_bench

    res = _bench_result()
    plan = bench_plot(res)
    assert plan.compared
    by_label = {b.label: b for b in plan.bars}
    assert set(by_label) == {r.metric for r in res.rows if not r.key.startswith("params")}  # bench.md's names
    ttft = by_label["Time to first token: 64-token prompt"]
    assert ttft.value == pytest.approx(0.1 / 0.54) and ttft.note == "5.40x slower"  # left of 1: worse
    train = by_label["Training throughput: fwd + bwd"]
    assert train.value == pytest.approx(2.0) and train.note == "2.00x faster"
    assert by_label["Activation memory, measured"].note == "2.00x less memory"
    assert "right of 1 = nanogpt better" in plan.xlabel
    png = plot_bench(res, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _serving_level(c: int, ours_tps: float, hf_tps: float, itl_p99: float) -> dict:
    return {"concurrency": c, "ours": {"tokens_per_s": ours_tps, "itl_p99_s": itl_p99}, "hf_static": {"tokens_per_s": hf_tps}}  # fmt: skip


def test_serving_report_prints_no_unmeasured_ratio_lines():
    """`bench --serve` printed "ours@16 / ours@1 tokens/s = — (target >= 8: not measured)" for every level it
    did not run: each printed line now carries a figure, and one line says what was not measured and why."""
    from nanogpt.bench.serving import ratio_lines, target_ratios

    some = ratio_lines({"ratios": target_ratios([_serving_level(1, 10.0, 10.0, 0.01)])})
    assert not any("—" in line or "target >= 8: not measured" in line for line in some), some
    assert some == [
        "not measured: ours@16 / HF@16 tokens/s; ours@32 / HF@32 tokens/s; "
        "ITL p99@16 / ITL p99@1 (they need --concurrency 1,16,32)"
    ]
    levels = [_serving_level(1, 10.0, 10.0, 0.01), _serving_level(16, 90.0, 50.0, 0.02)]
    levels.append(_serving_level(32, 100.0, 90.0, 0.03))
    every = ratio_lines({"ratios": target_ratios(levels)})
    assert every == [
        "ours@16 / HF@16 tokens/s = 1.80 (serving target >= 1.5: met)",
        "ours@32 / HF@32 tokens/s = 1.11 (serving target >= 1.3: missed)",
        "ITL p99@16 / ITL p99@1 = 2.00 (serving target <= 3: met)",
    ]
