"""nanogpt bench: the pure math, then real runs on a tiny config (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from nanogpt.bench import run as bench
from nanogpt.bench.measure import RowSpec, Timing, Workload, impossible, run_workloads
from nanogpt.bench.run import (
    NEW_TOKENS,
    Row,
    Stat,
    activation_estimate,
    check_rows,
    decode_step_bytes,
    forward_flops_per_token,
    load_warnings,
    rate_row,
    run_bench,
    time_row,
)
from nanogpt.commands import bench as bench_command
from nanogpt.errors import UserError
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import save_model
from nanogpt.train.loop import flops_per_token
from tests.bad_input import refuse
from tests.tiny import tiny_config

# every row a run writes; with --peers each also has a peer value
KEYS = {
    "params_total", "params_unique", "weights_fp32_mib", "weights_fp16_mib",
    "train_tokens_per_s", "train_batches_per_s", "forward_tokens_per_s", "forward_batches_per_s",
    "decode_tokens_per_s", "latency_per_100_tokens_s", "ttft_s", "eval_tokens_per_s",
    "eval_overlap_tokens_per_s",
    "activation_mib", "activation_estimate_mib", "mfu_train", "mfu_forward", "decode_bandwidth_fraction",
}  # fmt: skip


# --- pure functions -----------------------------------------------------------------------------------


def test_forward_flops_are_a_third_of_the_training_estimate(tiny_cfg):
    n = NanoGPTLMHeadModel(tiny_cfg).num_params()
    fwd = forward_flops_per_token(tiny_cfg, n, tiny_cfg.context_length)
    assert fwd * 3 == pytest.approx(flops_per_token(tiny_cfg, n))
    # attention grows with the sequence, the weight term does not
    assert forward_flops_per_token(tiny_cfg, n, 32) < fwd


def test_activation_estimate_is_linear_in_tokens_and_counts_the_logits(tiny_cfg):
    one = activation_estimate(tiny_cfg, 1, 16, stock=True)
    assert activation_estimate(tiny_cfg, 4, 16, stock=True) == 4 * one
    assert activation_estimate(tiny_cfg, 2, 32, stock=True) == 4 * one
    # the stock head: logits, their log-softmax and their gradient, 3 x V fp32 per token at least
    assert one > 16 * 3 * tiny_cfg.vocab_size * 4
    assert activation_estimate(replace(tiny_cfg, dropout=0.1), 1, 16, stock=True) > one  # masks
    # with dropout, our query blocks keep 5/8 of the (T, T) scores a stock model keeps
    drop = replace(tiny_cfg, dropout=0.1)
    stock_scores = activation_estimate(drop, 1, 16, stock=True) - one
    ours_scores = activation_estimate(drop, 1, 16) - activation_estimate(tiny_cfg, 1, 16)
    masks = 16 * tiny_cfg.n_layers * 3 * tiny_cfg.d_model
    assert (ours_scores - masks) * 8 == (stock_scores - masks) * 5


def test_fused_head_estimate_holds_one_chunk_not_the_logits(tiny_cfg):
    V, d = tiny_cfg.vocab_size, tiny_cfg.d_model
    small, big = activation_estimate(tiny_cfg, 1, 16), activation_estimate(tiny_cfg, 64, 64)
    assert small > (16 + d) * V * 4  # a 16-position buffer and the head weight's fp32 gradient
    # 4,096 positions: a 512-position buffer, far below the stock head's 3 x V fp32 per position
    assert big < activation_estimate(tiny_cfg, 64, 64, stock=True) / 5
    assert big - activation_estimate(tiny_cfg, 32, 64) < 32 * 64 * 3 * V * 4 / 100


def test_decode_bound_row_is_the_rate_over_its_bound(tiny_cfg):
    """The bound row: tokens/s x bytes a step reads / copy bandwidth, ours and the peer's, bytes named."""
    from nanogpt.bench.table import bound_row

    rate = Row("decode_tokens_per_s", "Decode", 200.0, "tokens/s", peer=100.0)
    step = decode_step_bytes(tiny_cfg, "bf16", [8 + 56 // 2])
    r = bound_row("decode_bandwidth_fraction", rate, {"copy_gb_s": 5.0}, tiny_cfg, "bf16", 56)
    assert r.value == pytest.approx(200.0 * step / 5e9) and r.peer == pytest.approx(100.0 * step / 5e9)
    assert r.unit == "fraction" and f"{step / 2**20:.1f} MiB read per token (bf16 weights" in r.metric
    assert "at 36 positions" in r.metric and f"bound {5e9 / step:,.0f} tokens/s" in r.metric
    unmeasured = Row("d", "d", None, "tokens/s")  # a rate check_rows refused: no share of a bound either
    assert bound_row("k", unmeasured, {"copy_gb_s": 5.0}, tiny_cfg, "int8", 56).value is None


def test_rows_rates_latencies_and_ratio():
    ours, peer = Stat.of([2.0, 1.0, 4.0]), Stat.of([4.0, 4.0, 4.0])
    r = rate_row("x", "x", 100, "tokens/s", ours, peer)
    assert (r.value, r.lo, r.hi) == (50.0, 25.0, 100.0)  # median 2 s; slowest 4 s, fastest 1 s
    assert r.peer == 25.0 and r.ratio == 2.0
    t = time_row("t", "t", ours, peer)
    assert (t.value, t.lo, t.hi, t.ratio, t.higher_is_better) == (2.0, 1.0, 4.0, 0.5, False)
    assert Row("n", "n", 3.0, "params").ratio is None
    assert ours.scaled(2).median == 4.0


def test_a_workload_group_alternates_and_fills_its_rows_in_order():
    """`run_workloads`: every run of a group alternates (ours, peer, the next workload), and each RowSpec
    turns the same seconds into its row: a rate is work over seconds, a time the seconds scaled."""
    calls: list[str] = []

    def work(name: str):
        return lambda: calls.append(name) or sum(range(1000))  # some work: a run never takes zero seconds

    group = [
        Workload(
            "a",
            work("a ours"),
            work("a peer"),
            (RowSpec("a_rate", "A", "tokens/s", 10), RowSpec("a_time", "A per 2", "s", 2.0)),
        ),
        Workload("b", work("b ours"), None, (RowSpec("b_rate", "B", "batches/s"),)),
    ]
    rows = run_workloads(group, Timing(repeats=2, warmup=1, device=torch.device("cpu")))
    assert calls == ["a ours", "a peer", "b ours"] * 3  # one warm-up round, then two timed rounds
    assert [r.key for r in rows] == ["a_rate", "a_time", "b_rate"]
    a_rate, a_time, b_rate = rows
    assert a_rate.peer is not None and a_time.peer is not None and b_rate.peer is None
    assert a_time.value == pytest.approx(2 * 10 / a_rate.value)  # the same runs: 2 x median seconds
    assert a_time.unit == "s" and not a_time.higher_is_better and a_rate.higher_is_better


# --- validity: an impossible number is never written as a result ---------------------------------------


def test_impossible_values_are_named():
    assert "122.3% is above 100%" in impossible(1.223, "fraction")
    assert impossible(1.0, "fraction") is None and impossible(0.26, "fraction") is None
    for value, unit in (
        (math.nan, "tokens/s"),
        (math.inf, "s"),
        (-1.0, "s"),
        (0.0, "tokens/s"),
        (-2.0, "MiB"),
    ):
        assert impossible(value, unit) is not None, (value, unit)
    assert impossible(0.0, "nats") is None  # equal NLLs in float32: a real result
    assert impossible(3.5, "MiB") is None and impossible(1e9, "params") is None


def fake_result(rows: list[Row], warnings: list[str]) -> bench.BenchResult:
    """A BenchResult with these rows and the few machine facts the markdown prints."""
    return bench.BenchResult(
        config={},
        settings={"backend": "torch", "dtype": "fp32", "repeats": 3, "warmup": 1, "batch": 4, "seq": 512},
        machine={"cpu": "cpu", "cores": 2, "torch_threads": 2, "device": "cpu", "gpu": None, "versions": {}},
        roofline={"backend": "torch", "dtype": "fp32", "matmul_gflops": {"qkv": 10.0}, "copy_gb_s": 5.0},
        rows=rows,
        load_average={"start": [3.5, 2.0, 1.0], "end": [4.0, 2.5, 1.2]},
        warnings=warnings,
    )


def test_check_rows_leaves_out_impossible_values_with_a_warning(tmp_path):
    fast, zero = Stat.of([0.5, 0.4, 0.6]), Stat.of([0.0, 0.0, 0.0])
    rows = [
        rate_row("forward_tokens_per_s", "Forward", 100, "tokens/s", fast, zero),  # the peer took no time
        Row("mfu_forward", "MFU forward", 1.223, "fraction", peer=0.3),  # 122.3% of the measured peak
        Row("params_total", "Parameters", 10.0, "params", peer=10.0),
    ]
    warnings = check_rows(rows)
    assert len(warnings) == 2
    assert "forward_tokens_per_s (peer)" in warnings[0] and "zero or negative time" in warnings[0]
    assert "mfu_forward (ours)" in warnings[1] and "122.3%" in warnings[1]
    fwd, mfu, params = rows
    assert fwd.value == 200.0 and (fwd.peer, fwd.peer_lo, fwd.peer_hi) == (None, None, None)
    assert mfu.value is None and mfu.peer == 0.3 and mfu.ratio is None
    assert (fwd.invalid, mfu.invalid, params.invalid) == (["peer"], ["ours"], [])
    assert params.ratio == 1.0  # valid rows are untouched

    res = fake_result(rows, warnings)
    out = bench.write_outputs(res, tmp_path / "out")
    data = json.loads((out / "bench.json").read_text())  # NaN would be invalid JSON: there is none
    rows_json = {r["key"]: r for r in data["rows"]}
    assert rows_json["mfu_forward"]["value"] is None and rows_json["mfu_forward"]["invalid"] == ["ours"]
    assert rows_json["forward_tokens_per_s"]["peer"] is None and data["warnings"] == warnings
    md = (out / "bench.md").read_text()
    assert "| MFU forward | invalid (see warnings) | 30.0% |  |" in md
    assert "| Forward | 200 (167–250) tokens/s | invalid (see warnings) |  |" in md
    assert md.rstrip().endswith(f"- {warnings[1]}") and "\nWarnings:\n" in md
    assert "122" not in md.split("Warnings:")[0]  # the impossible number appears only in its warning
    again = bench.load_bench(out)  # what `nanogpt export --bench` reads back
    assert again.row("mfu_forward").value is None and again.warnings == warnings


def test_load_warnings_subtract_the_bench_own_threads():
    assert load_warnings([0.2, 0.1, 0.1], [2.1, 1.0, 0.5], cores=2, own_threads=2) == []  # only ourselves
    (before,) = load_warnings([1.5, 1.0, 0.5], [2.0, 1.0, 0.5], cores=2, own_threads=2)
    assert "busy before the bench (load average 1.50 on 2 cores)" in before
    (during,) = load_warnings([0.0, 0.0, 0.0], [3.5, 1.0, 0.5], cores=2, own_threads=2)
    assert "busy during the bench" in during
    # more torch threads than cores still load at most every core
    assert load_warnings([0.0] * 3, [2.5, 1.0, 0.5], cores=2, own_threads=8) == []
    assert len(load_warnings([0.0] * 3, [3.5, 1.0, 0.5], cores=2, own_threads=8)) == 1


# --- real runs on a tiny config -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One `nanogpt bench --peers` on a saved tiny checkpoint, 1 repeat: its JSON and output folder."""
    pytest.importorskip("transformers")
    cfg = tiny_config()
    tmp = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    save_model(tmp / "ckpt", NanoGPTLMHeadModel(cfg))
    out = tmp / "out"
    argv = ["--model", str(tmp / "ckpt"), "--peers", "--repeats", "1", "--batch", "2", "--seq", "32"]
    assert bench_command.main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    return json.loads((out / "bench.json").read_text()), out


def test_cli_writes_json_markdown_and_png(cli_run):
    data, out = cli_run
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert md.startswith("| Metric | Value | HF GPT2LMHeadModel | Ours / peer |")
    assert "Training throughput: forward + backward + AdamW step, batch 2 x 32" in md
    assert data["settings"]["batch"] == 2 and data["settings"]["seq"] == 32
    assert data["settings"]["new_tokens"] == 64 - 8  # prompt + new tokens fit the context
    assert data["machine"]["cores"] >= 1 and "torch" in data["machine"]["versions"]
    assert len(data["load_average"]["start"]) == 3
    # the recorded load averages are the ones the warnings were drawn from
    la, m = data["load_average"], data["machine"]
    busy = load_warnings(la["start"], la["end"], m["cores"], m["torch_threads"])
    assert [w for w in data["warnings"] if "busy" in w] == busy
    assert ("Warnings:" in (out / "bench.md").read_text()) == bool(data["warnings"])


def test_every_row_positive_with_a_peer_ratio(cli_run):
    data, _ = cli_run
    rows = {r["key"]: r for r in data["rows"]}
    assert set(rows) == KEYS
    for key, r in rows.items():
        if r[
            "invalid"
        ]:  # e.g. a tiny model's MFU above the measured peak: withheld, never written as a result
            assert r["ratio"] is None and any(w.startswith(key) for w in data["warnings"]), key
            assert all(r["value" if who == "ours" else "peer"] is None for who in r["invalid"]), key
            continue
        assert r["value"] > 0 and math.isfinite(r["value"]), key
        assert r["peer"] > 0, key
        assert r["ratio"] == pytest.approx(r["value"] / r["peer"]), key
    # same shapes: HF's model has exactly our parameter count
    assert rows["params_unique"]["ratio"] == 1.0 and rows["params_total"]["ratio"] == 1.0
    assert rows["train_tokens_per_s"]["value"] == pytest.approx(64 * rows["train_batches_per_s"]["value"])
    assert rows["latency_per_100_tokens_s"]["value"] == pytest.approx(
        NEW_TOKENS / rows["decode_tokens_per_s"]["value"]
    )
    assert data["roofline"]["peak_gflops"] > 0 and data["roofline"]["copy_gb_s"] > 0


def test_activation_memory_is_measured_near_the_estimate(cli_run):
    """The RSS measurement sees the logits: within a factor of 3 of the estimate (it is ~75 MiB here)."""
    data, _ = cli_run
    rows = {r["key"]: r for r in data["rows"]}
    assert "VmHWM" in data["activation"]["ours"]["method"]
    ratio = rows["activation_mib"]["value"] / rows["activation_estimate_mib"]["value"]
    assert 1 / 3 < ratio < 3


def test_peer_and_ours_evaluate_the_same_windows(tiny_cfg):
    """With our weights loaded into the HF peer, both eval rows give the same mean NLL at both strides."""
    from nanogpt.bench.workloads import Inputs, PeerRunner, TorchRunner, overlap_stride, peer_model
    from nanogpt.export.hf import to_gpt2_state
    from nanogpt.train.checkpoint import model_state

    torch.manual_seed(0)
    cfg = replace(tiny_cfg, activation="gelu_tanh")  # GPT-2's own GELU, so the peer is the same function
    ours = NanoGPTLMHeadModel(cfg)
    peer = peer_model(cfg)
    missing, _ = peer.load_state_dict(to_gpt2_state(model_state(ours)), strict=False)
    assert all(k.endswith(("attn.bias", "masked_bias", "lm_head.weight")) for k in missing)
    inp = Inputs.make(cfg, 2, 32, 3)
    cpu = torch.device("cpu")
    mine, theirs = TorchRunner(ours, inp, "fp32", cpu), PeerRunner(peer, inp, "fp32", cpu)
    for stride in (32, overlap_stride(32)):  # the eval row and the overlapping-windows row
        assert mine.mean_nll(stride) == pytest.approx(theirs.mean_nll(stride), rel=1e-5), stride
    assert mine.mean_nll(32) != pytest.approx(mine.mean_nll(overlap_stride(32)), rel=1e-6)


def test_run_bench_without_peers_and_bf16(tiny_cfg):
    torch.manual_seed(0)
    res = run_bench(NanoGPTLMHeadModel(tiny_cfg), batch=1, seq=16, dtype="bf16", repeats=1, warmup=0)
    assert {r.key for r in res.rows} == KEYS | {"low_precision_nll_delta"}
    assert all(r.peer is None and r.ratio is None for r in res.rows)
    # every row has a value; only a fraction of a ceiling may be refused, when load disturbed the ceiling's
    # measurement (above 100% is impossible), and then the run says so
    refused = {r.key for r in res.rows if r.value is None}
    assert all(r.value > 0 for r in res.rows if r.key not in refused)
    assert all(
        r.unit == "fraction" and any(k in w for w in res.warnings)
        for k in refused
        for r in res.rows
        if r.key == k
    )
    assert res.row("low_precision_nll_delta").value < 0.05  # bf16 autocast: a rounding-sized difference
    assert res.roofline["dtype"] == "bf16" and res.settings["dtype"] == "bf16"


def test_accuracy_cost_format():
    from nanogpt.bench.run import fmt

    assert fmt(0.0, "nats") == "0 (equal in float32)" and fmt(2.19e-05, "nats") == "2.19e-05"


@pytest.mark.slow
def test_bf16_run_reports_both_models_accuracy_cost(tiny_cfg):
    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(tiny_cfg)
    res = run_bench(model, batch=1, seq=16, dtype="bf16", repeats=1, warmup=0, peers=True)
    row = res.row("low_precision_nll_delta")
    assert 0 < row.value < 0.05 and 0 < row.peer < 0.05
    assert "fp32" in row.metric and "bf16" in row.metric


def test_bad_settings_are_one_line_errors(tiny_cfg):
    model = NanoGPTLMHeadModel(tiny_cfg)
    with pytest.raises(UserError, match="--seq 65"):
        run_bench(model, seq=65)
    with pytest.raises(UserError, match="fp32 only"):
        run_bench(model, seq=16, backend="mlx", dtype="bf16")
    with pytest.raises(UserError, match="drop --compile"):
        run_bench(model, seq=16, backend="mlx", compile=True)


def test_mlx_backend_rows(tiny_cfg):
    pytest.importorskip("mlx.core")
    torch.manual_seed(0)
    res = run_bench(NanoGPTLMHeadModel(tiny_cfg), batch=1, seq=16, repeats=1, warmup=0, backend="mlx")
    assert {r.key for r in res.rows} == KEYS
    # a value above its measured ceiling on a loaded machine is withheld (None, with a warning), never reported
    assert all(r.value > 0 if "ours" not in r.invalid else r.value is None for r in res.rows)
    assert res.roofline["backend"] == "mlx" and "MLX" in res.activation["ours"]["method"]


def test_activation_probe_without_proc_measures_with_getrusage():
    import nanogpt.bench.workloads as w

    """macOS has no /proc: a fresh process's peak RSS (getrusage) still measures the step's activations."""
    code = (
        "import json, sys; from pathlib import Path; import torch\n"
        "import nanogpt.bench.workloads as w\n"
        "w.PROC_SELF = Path('/nonexistent/proc/self')\n"
        "from nanogpt.config import ModelConfig\n"
        "cfg = ModelConfig(d_model=64, n_layers=2, n_heads=2, d_ff=256, context_length=128)\n"
        "print(json.dumps(w.activation_probe(cfg, 16, 128, 'fp32', 'ours', torch.device('cpu'))))\n"
    )
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # as the bench's probe process runs
    argv = [sys.executable, "-c", w.HOP, sys.executable, "-c", code]  # from a small parent, as the bench does
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert "getrusage" in got["method"]
    # the step needs the head's chunk buffer (128 MiB) and the blocks' activations on top of the setup
    assert got["activation"] > 1 << 20 and got["peak"] > got["base"], got


def test_bench_refuses_what_it_cannot_measure_before_any_row(capsys, monkeypatch, tmp_path):
    """No way to read activation memory (Windows' CPU): refused up front, not after minutes of timed rows."""
    import builtins

    import nanogpt.bench.workloads as w

    real_import = builtins.__import__

    def no_resource(name, *args, **kwargs):
        if name == "resource":
            raise ImportError("no resource module here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(w, "PROC_SELF", tmp_path / "no_proc")
    monkeypatch.setattr(builtins, "__import__", no_resource)
    out = tmp_path / "bench"
    refuse(
        capsys,
        ["bench", "--preset", "tiny", "--repeats", "1", "--out", str(out)],
        names="cannot measure activation memory",
        fix="Linux, macOS or a CUDA device",
    )
    assert not out.exists()
    assert "roofline" not in capsys.readouterr().err  # no row ran
