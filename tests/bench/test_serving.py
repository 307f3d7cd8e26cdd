"""`nanogpt bench --serve`: the statistics on hand-made timestamps, the HF static batch at tiny size, and the
load generator against a real `nanogpt serve` subprocess (counts and shapes only, no timing assertions)."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from nanogpt.bench.loadgen import (
    RequestPlan,
    RequestResult,
    ServerProcess,
    inter_token_latencies,
    parse_metrics,
    parse_serve_args,
    percentile,
    plan_requests,
    stream_completion,
    summarize_level,
    tokens_in_chunk,
)
from nanogpt.bench.measure import decode_step_bytes
from nanogpt.bench.serving import (
    PROFILE_PHASES,
    SERVE_MAX_BATCH,
    ServeSettings,
    check_serve_settings,
    level_bound,
    mean_decode_positions,
    random_checkpoint,
    served_decode,
    server_profile,
    table,
    target_ratios,
)
from nanogpt.bench.workloads import peer_model, peer_static_batch
from nanogpt.commands import bench as bench_command
from nanogpt.data.tokenizer import EOT_ID
from nanogpt.errors import UserError
from tests.local_server import free_port
from tests.tiny import tiny_config

# --- pure statistics ----------------------------------------------------------------------------------


def test_percentile_interpolates_between_order_statistics():
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    xs = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 99) == pytest.approx(3.97)  # 1 + 0.99 * 3 = 3.97: between 3 and 4
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_itl_ttft_and_tokens_from_hand_made_timestamps():
    r = RequestResult(client=0, prompt_tokens=5, max_tokens=5, start=10.0, end=10.9)
    r.chunk_times = [10.2, 10.25, 10.35, 10.85]
    r.chunk_tokens = [1, 1, 2, 1]  # the third chunk carries two tokens: one gap, not two
    r.finish_reason = "length"
    assert inter_token_latencies([]) == [] and inter_token_latencies([1.0]) == []
    assert r.itls == pytest.approx([0.05, 0.10, 0.50])
    assert r.ttft == pytest.approx(0.2)
    assert r.tokens == 5 and r.ok
    s = r.summary()
    assert s["itl_max_s"] == pytest.approx(0.5) and s["latency_s"] == pytest.approx(0.9)
    assert s["chunks"] == 4 and s["tokens"] == 5


def test_summarize_level_pools_requests_and_counts_failures():
    a = RequestResult(0, 4, 3, start=0.0, end=1.0, chunk_times=[0.1, 0.2, 0.4], chunk_tokens=[1, 1, 1])
    a.finish_reason = "length"
    b = RequestResult(1, 4, 3, start=0.0, end=2.0, chunk_times=[0.3, 0.6, 1.0], chunk_tokens=[1, 1, 1])
    b.finish_reason = "length"
    bad = RequestResult(2, 4, 3, start=0.5, end=0.6, chunk_times=[0.55], chunk_tokens=[1])
    bad.error = "HTTP 503: queue full"
    s = summarize_level([a, b, bad], wall_s=2.0)
    assert (s["requests"], s["completed"], s["failed"]) == (3, 2, 1)
    assert s["tokens"] == 7 and s["tokens_asked"] == 9 and s["tokens_per_s"] == pytest.approx(3.5)
    assert s["errors"] == ["HTTP 503: queue full"]
    assert s["finish_reasons"] == {"length": 2, "none": 1}
    # latencies come from the completed requests only: TTFT 0.1 and 0.3, ITLs 0.1 0.2 0.3 0.4
    assert s["ttft_p50_s"] == pytest.approx(0.2)
    assert s["itl_p50_s"] == pytest.approx(0.25)
    assert s["itl_p99_s"] == pytest.approx(0.397)  # position 0.99 * 3 = 2.97: 0.3 + 0.97 * 0.1
    assert s["ttft_p50_s"] <= s["ttft_p99_s"] and s["itl_p50_s"] <= s["itl_p99_s"]
    assert summarize_level([], 0.0)["tokens_per_s"] is None


def test_tokens_in_chunk_exact_from_logprobs_else_one_per_text():
    assert tokens_in_chunk({"text": "ab", "logprobs": {"tokens": ["token_id:1", "token_id:2"]}}) == (2, True)
    assert tokens_in_chunk({"text": "", "logprobs": {"tokens": ["token_id:9"]}}) == (1, True)  # half a char
    assert tokens_in_chunk({"text": "x", "logprobs": None}) == (1, False)
    assert tokens_in_chunk({"text": "", "finish_reason": "length"}) == (0, False)


def test_plan_requests_is_seeded_in_range_and_never_holds_eot():
    a = plan_requests(20, (3, 9), (2, 5), 50257, seed=4)
    assert a == plan_requests(20, (3, 9), (2, 5), 50257, seed=4)
    assert a != plan_requests(20, (3, 9), (2, 5), 50257, seed=5)
    assert all(3 <= len(p.prompt) <= 9 and 2 <= p.max_tokens <= 5 for p in a)
    assert all(0 <= t < EOT_ID for p in a for t in p.prompt)
    assert len({len(p.prompt) for p in a}) > 1  # mixed lengths


def test_target_ratios_from_levels():
    def level(c, ours, hf, itl):
        return {
            "concurrency": c,
            "ours": {"tokens_per_s": ours, "itl_p99_s": itl},
            "hf_static": {"tokens_per_s": hf},
        }

    r = target_ratios(
        [level(1, 100.0, 50.0, 0.01), level(16, 900.0, 500.0, 0.02), level(32, 1000.0, 900.0, 0.05)]
    )
    assert r["ours16_over_hf16"]["value"] == pytest.approx(1.8) and r["ours16_over_hf16"]["meets"]
    assert r["ours32_over_hf32"]["meets"] is False  # 1.11 < 1.3
    assert r["itl_p99_16_over_1"]["value"] == pytest.approx(2.0) and r["itl_p99_16_over_1"]["meets"]
    assert all(
        v["value"] is None and v["meets"] is None for v in target_ratios([level(1, 1.0, 1.0, 1.0)]).values()
    )


def test_server_profile_from_scraped_counters():
    text = "\n".join(
        [
            "# HELP nanogpt_engine_seconds_total the scheduler's time by phase",
            'nanogpt_engine_seconds_total{phase="decode"} 6.0',
            'nanogpt_engine_seconds_total{phase="prefill"} 1.5',
            'nanogpt_engine_seconds_total{phase="sampling"} 0.5',
            'nanogpt_engine_seconds_total{phase="idle"} 1.0',
            "nanogpt_decode_steps_total 100.0",
            "nanogpt_decode_rows_total 1200.0",
            'nanogpt_decode_keys_total{kind="read"} 3000.0',
            'nanogpt_decode_keys_total{kind="needed"} 2000.0',
            "nanogpt_prefill_tokens_total 640.0",
            'nanogpt_requests_total{path="/a b",status="200"} 3.0',  # a space inside a label value
            "not a sample",
        ]
    )
    counted = parse_metrics(text)
    assert counted['nanogpt_requests_total{path="/a b",status="200"}'] == 3.0 and "not a" not in counted
    p = server_profile(counted, wall=10.0)
    assert p["shares"]["decode"] == 0.6 and p["shares"]["other"] == pytest.approx(0.1)  # 1 - 9 of 10 s
    assert (p["decode_steps"], p["decode_rows"], p["mean_rows"]) == (100, 1200, 12.0)
    assert p["decode_step_s"] == 0.06 and p["keys_read_over_needed"] == 1.5 and p["prefill_tokens"] == 640
    assert server_profile(parse_metrics("nanogpt_generated_tokens_total 5.0"), 10.0) is None  # no counters
    # the bench may not import the server (sibling layers): its phase names are kept equal to the engine's here,
    # else a renamed phase's time would land unnoticed in "other"
    from nanogpt.serve.engine import PHASES

    assert sorted(PROFILE_PHASES) == sorted(PHASES)


def test_mean_decode_positions_from_the_requests():
    """A request's first token comes from its prefill; the step making token i >= 2 reads P + i - 1 keys."""
    requests = [
        {"prompt_tokens": 10, "tokens": 4},  # steps read 11, 12, 13 keys
        {"prompt_tokens": 5, "tokens": 1},  # prefill only: no decode step
        {"prompt_tokens": 2, "tokens": 2},  # one step, 3 keys
    ]
    assert mean_decode_positions(requests) == pytest.approx((11 + 12 + 13 + 3) / 4)
    assert mean_decode_positions(requests[1:2]) is None and mean_decode_positions([]) is None


def test_level_bound_is_rows_at_the_mean_positions_over_the_copy_bandwidth():
    cfg = tiny_config(context_length=32)
    requests = [{"prompt_tokens": 10, "tokens": 4}, {"prompt_tokens": 2, "tokens": 2}]  # mean 9.75 keys
    b = level_bound(cfg, "bf16", 3, requests, copy_gb_s=10.0, tokens_per_s=50.0)
    step = decode_step_bytes(cfg, "bf16", [10, 10, 10])
    assert (b["rows"], b["mean_positions"], b["step_bytes"]) == (3, 9.75, step)
    assert b["tokens_per_s"] == pytest.approx(3 * 10e9 / step)  # 3 tokens a step at 10 GB/s
    assert b["share"] == pytest.approx(50.0 / b["tokens_per_s"])
    none = level_bound(cfg, "int8", 2, [{"prompt_tokens": 5, "tokens": 1}], 10.0, 50.0)
    assert none["tokens_per_s"] is None and none["share"] is None  # no decode step ran: no bound
    # results from before the bound render its columns empty
    lv = {"concurrency": 1, "ratio": 1.0, "hf_static": {"tokens_per_s": 1.0}, "ours": {
        "tokens_per_s": 1.0, "ttft_p50_s": 0.1, "ttft_p99_s": 0.1, "itl_p50_s": 0.1, "itl_p99_s": 0.1,
        "completed": 1, "failed": 0}}  # fmt: skip
    assert table({"levels": [lv]}).endswith("| 1/0 | — | — | — | — |")
    assert table({"levels": [{**lv, "bound": b}]}).endswith(
        f"| {b['tokens_per_s']:.1f} | {50 / b['tokens_per_s'] * 100:.1f}% | — | — |"
    )


def test_served_decode_reads_the_servers_flags_and_defaults():
    from nanogpt.commands.serve import build_parser

    defaults = build_parser().parse_args(["--model", "m"])
    assert served_decode([]) == (defaults.dtype, defaults.max_batch) == ("fp32", SERVE_MAX_BATCH)
    assert served_decode(["--max-batch", "4", "--dtype=int8", "--prefill-chunk", "8"]) == ("int8", 4)
    assert served_decode(["--max-concurrent=8"]) == ("fp32", 8)  # serve's other name for --max-batch
    with pytest.raises(UserError, match="--serve-args: .*--max-batch"):
        served_decode(["--max-batch", "many"])


def test_settings_and_serve_args_are_checked_before_any_server_starts():
    cfg = tiny_config(context_length=32)
    check_serve_settings(cfg, ServeSettings(prompt_tokens=(4, 16), max_tokens=(4, 16)))
    for bad in (
        ServeSettings(prompt_tokens=(4, 20), max_tokens=(4, 16)),  # 36 > context 32
        ServeSettings(concurrency=(), prompt_tokens=(4, 8), max_tokens=(4, 8)),
        ServeSettings(requests_per_client=0, prompt_tokens=(4, 8), max_tokens=(4, 8)),
        ServeSettings(prompt_tokens=(0, 8), max_tokens=(4, 8)),
    ):
        with pytest.raises(UserError):
            check_serve_settings(cfg, bad)
    assert parse_serve_args('--max-batch 32 --dtype "bf16"') == ["--max-batch", "32", "--dtype", "bf16"]
    for bad in ("--port 9000", "--threads=4", "--model x", '--dtype "bf16'):
        with pytest.raises(UserError):
            parse_serve_args(bad)
    for argv in (
        ["--dtype", "bf16"],
        ["--compile"],
        ["--batch", "2"],
        ["--concurrency", "0"],
        ["--max-tokens", "9:3"],
    ):
        with pytest.raises(UserError):
            bench_command.main(["--serve", *argv])


class FakeServer(BaseHTTPRequestHandler):
    """Streams what another server might: several tokens per chunk, a usage-only chunk, a 503, an error."""

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        kind = body["prompt"][0]
        if kind == 1:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "queue full"}}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        events = [
            {
                "choices": [
                    {
                        "text": "ab",
                        "logprobs": {"tokens": ["token_id:1", "token_id:2"]},
                        "finish_reason": None,
                    }
                ]
            },
            {"choices": [{"text": "c", "logprobs": {"tokens": ["token_id:3"]}, "finish_reason": "length"}]},
            {"choices": [], "usage": {"completion_tokens": 3}},
        ]
        if kind == 2:
            events = [events[0], {"error": {"message": "prompt too long"}}]
        for e in events:
            self.wfile.write(f"data: {json.dumps(e)}\n\n".encode())
            self.wfile.flush()
        if kind != 2:
            self.wfile.write(b"data: [DONE]\n\n")


def test_stream_parsing_of_other_servers_chunks():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        port = httpd.server_address[1]
        ok = stream_completion("127.0.0.1", port, RequestPlan([0, 5], 3), "m")
        assert ok.ok and ok.tokens == 3 and len(ok.chunk_times) == 2 and ok.finish_reason == "length"
        assert len(ok.itls) == 1 and ok.exact
        busy = stream_completion("127.0.0.1", port, RequestPlan([1], 3), "m")
        assert not busy.ok and busy.error.startswith("HTTP 503") and busy.tokens == 0
        broken = stream_completion("127.0.0.1", port, RequestPlan([2], 3), "m")
        assert not broken.ok and "prompt too long" in broken.error and broken.tokens == 2
        refused = stream_completion("127.0.0.1", free_port(), RequestPlan([0], 3), "m")  # nothing listens
        assert not refused.ok and "ConnectionRefusedError" in refused.error
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- the HF peer ----------------------------------------------------------------------------------------


def test_hf_static_batch_generates_exactly_the_asked_tokens_per_row():
    pytest.importorskip("transformers")
    cfg = tiny_config()
    run = peer_static_batch(
        peer_model(cfg), batch=3, prompt_tokens=5, new_tokens=7, device=torch.device("cpu")
    )
    new = run()
    assert tuple(new.shape) == (3, 7)
    assert not (new == EOT_ID).any()  # min_new_tokens = max_new_tokens: EOS is suppressed, no row ends early
    assert torch.equal(new, run())  # greedy: the same tokens again


# --- against a real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eot_free_ckpt(tmp_path_factory):
    """The tiny model, random init, its end-of-text output row zeroed: greedy decoding never stops early."""
    return random_checkpoint(tiny_config(context_length=32), tmp_path_factory.mktemp("serve_bench") / "tiny")


def test_load_generator_against_a_real_server(eot_free_ckpt, tmp_path, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("transformers")
    out_json, out_png = tmp_path / "r" / "serve.json", tmp_path / "serve.png"
    argv = ["--serve", "--model", str(eot_free_ckpt), "--concurrency", "1,2", "--requests-per-client", "2"]
    argv += ["--prompt-tokens", "3:10", "--max-tokens", "2:6", "--repeats", "1", "--threads", "1"]
    argv += ["--device", "cpu", "--json", str(out_json), "--plot", str(out_png)]
    argv += ["--serve-args=--max-batch 2"]
    assert bench_command.main(argv) == 0
    res = json.loads(out_json.read_text())
    assert {
        "kind",
        "model",
        "config",
        "settings",
        "machine",
        "load_average",
        "server",
        "levels",
        "ratios",
    } <= set(res)
    assert {"cpu", "cores", "torch_threads", "versions"} <= set(res["machine"])
    assert len(res["load_average"]["start"]) == 3 and len(res["load_average"]["end"]) == 3
    assert res["settings"]["serve_args"] == ["--max-batch", "2"] and res["settings"]["threads"] == 1
    assert "--max-batch" in res["server"]["command"] and res["server"]["stopped_by"] == "SIGTERM"
    with pytest.raises(ProcessLookupError):  # stopped and reaped: nothing left running
        os.kill(res["server"]["pid"], 0)
    assert set(res["ratios"]) == {
        "ours16_over_hf16",
        "ours32_over_hf32",
        "itl_p99_16_over_1",
    }
    assert [lv["concurrency"] for lv in res["levels"]] == [1, 2]
    bound = res["bound"]
    assert (bound["dtype"], bound["max_batch"]) == ("fp32", 2) and bound["copy_gb_s"] > 0
    for lv in res["levels"]:
        c, ours, hf = lv["concurrency"], lv["ours"], lv["hf_static"]
        assert set(ours) >= {
            "tokens_per_s",
            "ttft_p50_s",
            "ttft_p99_s",
            "itl_p50_s",
            "itl_p99_s",
            "completed",
            "failed",
        }
        assert (ours["requests"], ours["completed"], ours["failed"]) == (2 * c, 2 * c, 0)
        assert ours["exact_token_counts"] and ours["finish_reasons"] == {"length": 2 * c}
        assert ours["tokens"] == ours["tokens_asked"]  # every asked token arrived, counted exactly
        for r in lv["requests"]:
            assert (
                r["tokens"] == r["max_tokens"] and 2 <= r["max_tokens"] <= 6 and 3 <= r["prompt_tokens"] <= 10
            )
            assert r["chunks"] == r["tokens"] and r["error"] is None  # today's server: one token per chunk
        assert ours["ttft_p50_s"] <= ours["ttft_p99_s"] and ours["itl_p50_s"] <= ours["itl_p99_s"]
        assert ours["tokens_per_s"] > 0 and hf["tokens_per_s"] > 0 and lv["ratio"] > 0
        assert (hf["batch"], hf["prompt_tokens"], hf["new_tokens"]) == (c, 6, 4)  # the ranges' means
        # the bound of a c-row step (--max-batch 2) at the mean positions of the requests this level sent
        cfg, bw = tiny_config(context_length=32), bound["copy_gb_s"]
        b = lv["bound"]
        expected = level_bound(cfg, "fp32", c, lv["requests"], bw, ours["tokens_per_s"])
        assert {k: b[k] for k in expected} == expected and b["rows"] == c and b["share"] > 0
        # the server's c-row step timed alone, as a share of the same bound
        assert b["step_s"] > 0 and b["step_tokens_per_s"] == pytest.approx(c / b["step_s"])
        assert b["step_share"] == pytest.approx(b["step_tokens_per_s"] / b["tokens_per_s"])
        # the server's own profile of the level: every token after a request's first came from a decode row,
        # every prompt token was read by a prefill, and the phases share the time between the scrapes
        p = lv["profile"]
        assert p["decode_rows"] == sum(r["tokens"] - 1 for r in lv["requests"])
        assert p["prefill_tokens"] == sum(r["prompt_tokens"] for r in lv["requests"])
        assert 1 <= p["mean_rows"] <= c and p["decode_steps"] >= p["decode_rows"] / c
        if c == 1:  # one row: it reads exactly its own keys
            assert p["mean_rows"] == 1 and p["keys_read_over_needed"] == 1
        assert 0 < p["shares"]["decode"] < 1 and sum(p["shares"].values()) == pytest.approx(1, abs=0.02)
        assert p["decode_step_s"] == pytest.approx(p["seconds"]["decode"] / p["decode_steps"])
    assert out_png.stat().st_size > 0
    printed = capsys.readouterr().out
    assert (
        "| done/failed | bound tokens/s | ours % of bound | step alone tokens/s | step % of bound |"
        in printed
    )
    assert "bound: a decode step of C rows" in printed
    assert (
        "where the server's time went" in printed
        and "| mean rows | decode step ms | keys read / needed |" in printed
    )
    assert "| C | ours tokens/s | HF static tokens/s |" in printed and res["model"]["weights"].startswith(
        "checkpoint"
    )
    # only the levels 1 and 2 ran: the target ratios are named as not measured, with the levels they need
    assert "ours@16 / ours@1 tokens/s = —" not in printed
    assert "not measured: ours@16 / HF@16 tokens/s; " in printed
    assert "(they need --concurrency 1,16,32)" in printed


def test_server_that_cannot_start_is_one_line_and_gone(eot_free_ckpt, tmp_path):
    pytest.importorskip("uvicorn")
    s = ServerProcess(eot_free_ckpt, threads=1, log=tmp_path / "s.log", serve_args=["--max-batch", "0"])
    with (
        pytest.raises(UserError, match="exited with code 2 before it could print its address.*max-batch"),
        s,
    ):
        pass
    assert s.proc is not None and s.proc.poll() == 2


def test_server_is_stopped_when_the_run_fails(eot_free_ckpt, tmp_path):
    pytest.importorskip("uvicorn")
    s = ServerProcess(eot_free_ckpt, threads=1, log=tmp_path / "s.log")
    with pytest.raises(RuntimeError, match="boom"), s:
        assert s.port > 0 and s.name == "tiny" and s.max_model_len == 32
        assert s.proc is not None and s.proc.poll() is None
        raise RuntimeError("boom")
    assert s.proc.poll() is not None and s.stopped_by == "SIGTERM"


def test_random_checkpoint_never_prefers_eot(eot_free_ckpt):
    from nanogpt.train.checkpoint import load_model

    model = load_model(eot_free_ckpt)
    assert torch.count_nonzero(model.lm_head.weight[EOT_ID]) == 0
    plan = plan_requests(4, (3, 10), (1, 1), 50257, seed=1)
    with torch.no_grad():
        logits = model(torch.tensor([p.prompt[:3] for p in plan]))  # (4, 3, V)
    assert (logits.argmax(-1) != EOT_ID).all()
    assert RequestPlan([1], 1) == RequestPlan([1], 1)
