"""`nanogpt bench --serve`: `nanogpt serve` under load, level by level, with HF's static batch beside it.

For each concurrency C the load generator (`bench.loadgen`) runs C streaming clients against a real server
subprocess; then Hugging Face's `GPT2LMHeadModel` of the same shapes runs `generate` on one static batch of
C prompts in this process (same threads, fp32, greedy, a fixed number of new tokens per row). The two
alternate repeat by repeat, so machine load hits both alike. The report is one row per C (ours tokens/s,
HF's, their ratio, TTFT and ITL percentiles, and the memory bound of a C-row decode step with ours as a share
of it), the ratios the serving targets are stated in, the machine and its load average, as a table, a JSON
file and a plot.

    res = run_serving(ckpt, cfg, ServeSettings(concurrency=(1, 4)), torch.device("cpu"), log=Path("s.log"))
    print(report(res)); write_json(res, "serve.json"); plot_serving(res, "serve.png")
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nanogpt.bench.loadgen import (
    RequestPlan,
    ServerProcess,
    plan_requests,
    run_level,
    stream_completion,
    summarize_level,
)
from nanogpt.bench.measure import (
    PEER_NAME,
    batched_step_seconds,
    copy_bandwidth,
    decode_step_bytes,
    machine_info,
    memory_bound_tokens_per_s,
    sync,
)
from nanogpt.bench.workloads import peer_model, peer_static_batch
from nanogpt.config import ModelConfig
from nanogpt.data.tokenizer import EOT_ID
from nanogpt.errors import UserError

DEFAULT_CONCURRENCY = (1, 4, 16, 32)
LOAD_LIMIT = 1.0  # a 1-minute load average above this at the start: figures taken under load
SERVE_MAX_BATCH = 32  # `nanogpt serve --max-batch`'s default, a step's rows at most (a test keeps them equal)
COPY_REPEATS = 5  # copies of 256 MiB timed once per run, before the server starts: the bound's bandwidth
STEP_REPEATS = 20  # timed decode steps per level for the step-alone columns (after two warm-up steps)

# (key, what, numerator, denominator, comparison, target); a term is (who, C, field). Issue #30's restated
# targets: the old ours@16 >= 8 x ours@1 is gone (a 16-row step costs 2.7 one-row steps, so 16 streams get
# 5.9x one at best); ours@32 / HF@32 rose from 1.2 to 1.3.
TARGETS: tuple[tuple[str, str, tuple, tuple, str, float], ...] = (
    ("ours16_over_hf16", "ours@16 / HF@16 tokens/s", ("ours", 16, "tokens_per_s"), ("hf_static", 16, "tokens_per_s"), ">=", 1.5),
    ("ours32_over_hf32", "ours@32 / HF@32 tokens/s", ("ours", 32, "tokens_per_s"), ("hf_static", 32, "tokens_per_s"), ">=", 1.3),
    ("itl_p99_16_over_1", "ITL p99@16 / ITL p99@1", ("ours", 16, "itl_p99_s"), ("ours", 1, "itl_p99_s"), "<=", 3.0),
)  # fmt: skip


@dataclass(frozen=True)
class ServeSettings:
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    requests_per_client: int = 4
    prompt_tokens: tuple[int, int] = (16, 256)  # inclusive range, drawn per request
    max_tokens: tuple[int, int] = (64, 256)  # inclusive range, drawn per request
    repeats: int = 1
    seed: int = 0
    threads: int = 1
    serve_args: tuple[str, ...] = ()
    device: str | None = None  # passed to the server as --device (None: its default)

    @property
    def hf_prompt_tokens(self) -> int:
        return round(statistics.mean(self.prompt_tokens))

    @property
    def hf_new_tokens(self) -> int:
        return round(statistics.mean(self.max_tokens))


def check_serve_settings(cfg: ModelConfig, s: ServeSettings) -> None:
    """One-line errors for settings no load test can run with, before any server starts."""
    if not s.concurrency or min(s.concurrency) < 1:
        raise UserError(
            f"--concurrency {','.join(map(str, s.concurrency))}: pass levels >= 1, e.g. 1,4,16,32"
        )
    for flag, n in (("--requests-per-client", s.requests_per_client), ("--repeats", s.repeats)):
        if n < 1:
            raise UserError(f"{flag} {n} must be at least 1")
    for flag, (lo, hi) in (("--prompt-tokens", s.prompt_tokens), ("--max-tokens", s.max_tokens)):
        if not 1 <= lo <= hi:
            raise UserError(f"{flag} {lo}:{hi} must be LO:HI with 1 <= LO <= HI")
    if s.prompt_tokens[1] + s.max_tokens[1] > cfg.context_length:
        raise UserError(
            f"--prompt-tokens up to {s.prompt_tokens[1]} plus --max-tokens up to {s.max_tokens[1]} exceed the "
            f"model's context of {cfg.context_length}; lower the upper ends so they sum to at most that"
        )


def random_checkpoint(cfg: ModelConfig, dst: str | Path, seed: int = 0) -> Path:
    """A random-init checkpoint of `cfg` (fixed seed) whose greedy decoding never ends early: the output row
    of the end-of-text token is zeroed, so its logit is 0 against the vocabulary's other logits, of which the
    largest is positive. Speed does not depend on the weights; the text is meaningless."""
    from nanogpt.model.gpt import NanoGPTLMHeadModel
    from nanogpt.train.checkpoint import save_model

    torch.manual_seed(seed)
    model = NanoGPTLMHeadModel(cfg)
    if cfg.vocab_size > EOT_ID:
        with torch.no_grad():
            model.lm_head.weight[EOT_ID].zero_()  # tied: also the (never used) input row of EOT
    return save_model(dst, model)


def start_warnings(load0: list[float]) -> list[str]:
    """A warning when the machine was busy as the load test started (`os.getloadavg()`)."""
    if load0[0] <= LOAD_LIMIT:
        return []
    return [
        f"figures taken under load: the 1-minute load average was {load0[0]:.2f} at the start "
        f"(above {LOAD_LIMIT}); rerun on a quiet machine"
    ]


def run_serving(
    model_dir: str | Path,
    cfg: ModelConfig,
    s: ServeSettings,
    device: torch.device,
    log: Path,
    weights: str = "",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every level for `model_dir` served by a `nanogpt serve` subprocess (its output to `log`), and the
    HF static batch at each level; everything as one JSON-ready dict."""
    say = progress or (lambda _: None)
    check_serve_settings(cfg, s)
    t_start = time.perf_counter()
    load0 = list(os.getloadavg())
    warnings = start_warnings(load0)
    machine = machine_info(device)
    say(
        f"{machine['cpu']}, {machine['cores']} cores, torch {machine['versions']['torch']}, {s.threads} threads; "
        f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}"
        + (" (figures taken under load)" if warnings else "")
    )
    say(f"HF peer: {PEER_NAME} at the same shapes, random init, {device}")
    peer = peer_model(cfg).to(device)
    dtype, max_batch = served_decode(s.serve_args)
    say("copy bandwidth, for the memory bound (before the server starts, so nothing competes)")
    copy_gb_s = copy_bandwidth(device, COPY_REPEATS)
    res: dict[str, Any] = {
        "kind": "nanogpt bench --serve",
        "model": {"path": str(model_dir), "weights": weights},
        "config": cfg.to_dict(),
        "settings": {
            **asdict(s),
            "temperature": 0,
            "request": "stream /v1/completions, token-id prompt, logprobs 0, return_tokens_as_token_ids",
            "hf_prompt_tokens": s.hf_prompt_tokens,
            "hf_new_tokens": s.hf_new_tokens,
            "hf_dtype": "fp32",
            "peer": PEER_NAME,
        },
        "machine": machine,
        "load_average": {"start": load0},
        "server": {},
        "bound": {"dtype": dtype, "max_batch": max_batch, "copy_gb_s": copy_gb_s, "repeats": COPY_REPEATS},
        "levels": [],
        "warnings": warnings,
    }
    with ServerProcess(model_dir, s.threads, log, s.serve_args, s.device) as server:
        res["server"] = {
            "command": server.cmd[2:],
            "line": server.line,
            "model": server.name,
            "pid": server.pid,
        }
        say(server.line.strip())
        warm = stream_completion(server.host, server.port, RequestPlan(list(range(8)), 4), server.name)
        if not warm.ok:
            raise UserError(f"the server's warm-up request failed ({warm.error}); see {log}")
        peer_static_batch(peer, 1, 8, 2, device)()
        for c in s.concurrency:
            lv = _level(server, peer, cfg, s, c, device, say)
            rows = min(c, max_batch)  # each client has one request in flight; a step holds max_batch at most
            lv["bound"] = level_bound(cfg, dtype, rows, lv["requests"], copy_gb_s, lv["ours"]["tokens_per_s"])
            res["levels"].append(lv)
        res["server"]["exit_code"] = server.stop()
        res["server"]["stopped_by"] = server.stopped_by
    say("the server's decode step alone at each level's rows and positions, against its bound")
    step_alone(model_dir, dtype, res["levels"], device)
    res["load_average"]["end"] = list(os.getloadavg())
    res["ratios"] = target_ratios(res["levels"])
    res["seconds"] = time.perf_counter() - t_start
    return res


def _level(
    server: ServerProcess,
    peer: torch.nn.Module,
    cfg: ModelConfig,
    s: ServeSettings,
    c: int,
    device: torch.device,
    say: Callable[[str], None],
) -> dict[str, Any]:
    plans = plan_requests(
        c * s.requests_per_client, s.prompt_tokens, s.max_tokens, cfg.vocab_size, seed=s.seed * 10_007 + c
    )
    hf = peer_static_batch(peer, c, s.hf_prompt_tokens, s.hf_new_tokens, device, seed=s.seed)
    results, ours_runs, walls, hf_runs, hf_secs = [], [], [], [], []
    client_cpu, server_cpu = 0.0, []
    counted: dict[str, float] = {}  # the server's own counters (GET /metrics) over this level's runs
    counted_s = 0.0  # from the first scrape to the second, over the runs
    for r in range(s.repeats):
        t0 = time.perf_counter()
        cpu0, m0 = server.cpu_seconds(), server.metrics()
        got, wall, cpu = run_level(server, plans, c)
        cpu1, m1 = server.cpu_seconds(), server.metrics()
        counted_s += time.perf_counter() - t0
        for k, v in m1.items():
            counted[k] = counted.get(k, 0.0) + v - m0.get(k, 0.0)
        results += got
        walls.append(wall)
        ours_runs.append(sum(x.tokens for x in got) / wall if wall > 0 else 0.0)
        client_cpu += cpu
        server_cpu.append(cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None)
        hf_secs.append(_time_static_batch(hf, (c, s.hf_new_tokens), device))
        hf_runs.append(c * s.hf_new_tokens / hf_secs[-1])
        failed = sum(not x.ok for x in got)
        say(
            f"C={c} run {r + 1}/{s.repeats}: ours {ours_runs[-1]:.1f} tokens/s "
            f"({len(got) - failed}/{len(got)} requests done), HF static batch {hf_runs[-1]:.1f} tokens/s"
        )
    known = [x for x in server_cpu if x is not None]  # None: a run whose server CPU time was unreadable
    ours = summarize_level(results, sum(walls))
    ours.update(
        tokens_per_s=statistics.median(ours_runs),
        tokens_per_s_runs=ours_runs,
        wall_s_runs=walls,
        client_cpu_s=client_cpu,
        server_cpu_s=sum(known) if len(known) == len(server_cpu) else None,
    )
    del ours["wall_s"]
    hf_tps = statistics.median(hf_runs)
    return {
        "concurrency": c,
        "ours": ours,
        "hf_static": {
            "tokens_per_s": hf_tps,
            "tokens_per_s_runs": hf_runs,
            "seconds_runs": hf_secs,
            "batch": c,
            "prompt_tokens": s.hf_prompt_tokens,
            "new_tokens": s.hf_new_tokens,
        },
        "ratio": ours["tokens_per_s"] / hf_tps if hf_tps else None,
        "profile": server_profile(counted, counted_s),
        "requests": [x.summary() for x in results],
    }


# the engine's phases (serve.engine.PHASES; the bench does not import the server, a test keeps them equal)
PROFILE_PHASES = ("decode", "prefill", "sampling", "score", "attention", "idle")


def server_profile(counted: dict[str, float], wall: float) -> dict[str, Any] | None:
    """Where the server's scheduler spent a level's time, from its `/metrics` counters over the runs
    (`counted`: after - before, summed; `wall`: the seconds between those scrapes, summed, which hold each
    run and the scrapes around it): seconds and share of the wall per phase ("other": the rest, the
    scheduler's own bookkeeping and its waits for the GIL), the mean rows of a decode step, a decode
    forward's mean time, and keys read over keys needed. None for a server that does not count them."""
    steps = counted.get("nanogpt_decode_steps_total")
    if steps is None or wall <= 0:
        return None
    seconds = {p: counted.get(f'nanogpt_engine_seconds_total{{phase="{p}"}}', 0.0) for p in PROFILE_PHASES}
    shares = {p: v / wall for p, v in seconds.items()}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    rows = counted.get("nanogpt_decode_rows_total", 0.0)
    read = counted.get('nanogpt_decode_keys_total{kind="read"}', 0.0)
    needed = counted.get('nanogpt_decode_keys_total{kind="needed"}', 0.0)
    return {
        "wall_s": wall,
        "seconds": seconds,
        "shares": shares,
        "decode_steps": int(steps),
        "decode_rows": int(rows),
        "mean_rows": rows / steps if steps else None,
        "decode_step_s": seconds["decode"] / steps if steps else None,
        "keys_read_over_needed": read / needed if needed else None,
        "prefill_tokens": int(counted.get("nanogpt_prefill_tokens_total", 0.0)),
    }


def served_decode(serve_args: Sequence[str]) -> tuple[str, int]:
    """The dtype the server decodes in and its `--max-batch`, as `serve_args` set them, else the server's
    defaults (fp32, `SERVE_MAX_BATCH`). A value the server would refuse is left for it to refuse."""
    p = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--max-batch", "--max-concurrent", type=int, default=SERVE_MAX_BATCH)
    try:
        known, _ = p.parse_known_args(list(serve_args))
    except argparse.ArgumentError as e:
        raise UserError(f"--serve-args: {e}; check its --dtype and --max-batch") from None
    return known.dtype, known.max_batch


def mean_decode_positions(requests: Sequence[dict[str, Any]]) -> float | None:
    """The mean keys a row of a decode step reads over the level's requests (their `summary()`s): a request
    of P prompt tokens gets its first token from its prefill, and the decode step that makes its token
    i >= 2 reads P + i - 1 keys. None when no request had a decode step."""
    steps = keys = 0
    for r in requests:
        n, p = r["tokens"], r["prompt_tokens"]
        if n >= 2:
            steps += n - 1
            keys += (n - 1) * p + n * (n - 1) // 2  # the sum of p + i - 1 over i = 2..n
    return keys / steps if steps else None


def level_bound(
    cfg: ModelConfig,
    dtype: str,
    rows: int,
    requests: Sequence[dict[str, Any]],
    copy_gb_s: float,
    tokens_per_s: float | None,
) -> dict[str, Any]:
    """The memory bound of a level's decode step, `rows` rows each at the level's mean decode positions, read
    at the measured copy bandwidth (`decode_step_bytes`, `memory_bound_tokens_per_s`), and `tokens_per_s`
    (ours, measured) as a share of it."""
    positions = mean_decode_positions(requests)
    step = decode_step_bytes(cfg, dtype, [round(positions)] * rows) if positions is not None else None
    bound = memory_bound_tokens_per_s(rows, step, copy_gb_s) if step else None
    share = tokens_per_s / bound if tokens_per_s is not None and bound else None
    return {
        "rows": rows,
        "mean_positions": positions,
        "step_bytes": step,
        "tokens_per_s": bound,
        "share": share,
    }


def step_alone(model_dir: str | Path, dtype: str, levels: list[dict[str, Any]], device: torch.device) -> None:
    """Each level's decode step timed alone (`batched_step_seconds`: its rows, at its mean positions, in the
    server's dtype) after the server stopped, so nothing competes; its tokens/s and share of the level's
    bound go into the level's "bound" entry."""
    from nanogpt.kernels.quant import apply_dtype
    from nanogpt.train.checkpoint import load_model

    model = load_model(model_dir, device=device).eval()
    compute = apply_dtype(model, dtype)  # int8 quantizes the weights as the server does
    for lv in levels:
        b = lv["bound"]
        if b["mean_positions"] is None:  # no request decoded a token
            continue
        stat = batched_step_seconds(model, compute, b["rows"], round(b["mean_positions"]), STEP_REPEATS)
        b["step_s"] = stat.median
        b["step_tokens_per_s"] = b["rows"] / stat.median
        b["step_share"] = b["step_tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else None


def _time_static_batch(hf: Callable[[], torch.Tensor], shape: tuple[int, int], device: torch.device) -> float:
    """Seconds of one HF static-batch run, which must return `shape` (batch, new tokens) new ids."""
    sync(device)
    t0 = time.perf_counter()
    new = hf()
    sync(device)
    seconds = time.perf_counter() - t0
    if tuple(new.shape) != shape:
        raise RuntimeError(f"HF generate returned {tuple(new.shape)} new ids, not {shape}")
    return seconds


def target_ratios(levels: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The target ratios from the levels; a ratio whose levels did not run is None."""
    by_c = {lv["concurrency"]: lv for lv in levels}

    def term(t: tuple) -> float | None:
        who, c, key = t
        return by_c[c][who].get(key) if c in by_c else None

    out = {}
    for key, what, num, den, op, target in TARGETS:
        a, b = term(num), term(den)
        value = a / b if a is not None and b else None
        meets = None if value is None else (value >= target if op == ">=" else value <= target)
        out[key] = {"what": what, "value": value, "target": f"{op} {target:g}", "meets": meets}
    return out


# --- the report ---------------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1000:.1f}"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "—" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.1f}%"


def header(res: dict[str, Any]) -> list[str]:
    m, la, st = res["machine"], res["load_average"], res["settings"]
    end = la.get("end")
    loads = f"load average {', '.join(f'{x:.2f}' for x in la['start'])} at the start"
    if end:
        loads += f", {', '.join(f'{x:.2f}' for x in end)} at the end"
    lo_p, hi_p = st["prompt_tokens"]
    lo_n, hi_n = st["max_tokens"]
    return [
        f"nanogpt bench --serve: {res['model']['weights'] or res['model']['path']}",
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['versions']['torch']}, {st['threads']} threads; {loads}",
        f"server: {res['server'].get('line', '').strip()}  (args: {' '.join(st['serve_args']) or 'none'})",
        f"requests: {st['requests_per_client']} per client, prompts {lo_p}..{hi_p} tokens, max_tokens "
        f"{lo_n}..{hi_n}, greedy, streamed; {st['repeats']} run(s) per level",
        f"HF static batch: C prompts of {st['hf_prompt_tokens']} tokens, exactly {st['hf_new_tokens']} new tokens "
        "per row, greedy, fp32",
        *bound_line(res),
    ]


def bound_line(res: dict[str, Any]) -> list[str]:
    """What the bound columns mean, with this run's dtype and copy bandwidth (none for older results)."""
    b = res.get("bound")
    if b is None:
        return []
    return [
        f"bound: a decode step of C rows reads the weights once ({b['dtype']}, as the server decodes) and each "
        f"row's KV cache at the level's mean positions; bound = C x copy bandwidth ({b['copy_gb_s']:.1f} GB/s, "
        "measured before the server started) / those bytes; step alone: the server's step of those C rows "
        "timed in this process after the server stopped (no HTTP, no scheduling, no prefill)"
    ]


def table(res: dict[str, Any]) -> str:
    lines = [
        "| C | ours tokens/s | HF static tokens/s | ours/HF | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | done/failed | bound tokens/s | ours % of bound | step alone tokens/s | step % of bound |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for lv in res["levels"]:
        o, h, b = lv["ours"], lv["hf_static"], lv.get("bound", {})  # no bound: results from before it
        lines.append(
            f"| {lv['concurrency']} | {_num(o['tokens_per_s'])} | {_num(h['tokens_per_s'])} | "
            f"{_num(lv['ratio'], '.2f')} | {_ms(o['ttft_p50_s'])} | {_ms(o['ttft_p99_s'])} | "
            f"{_ms(o['itl_p50_s'])} | {_ms(o['itl_p99_s'])} | {o['completed']}/{o['failed']} | "
            f"{_num(b.get('tokens_per_s'))} | {_pct(b.get('share'))} | {_num(b.get('step_tokens_per_s'))} | "
            f"{_pct(b.get('step_share'))} |"
        )
    return "\n".join(lines)


def profile_table(res: dict[str, Any]) -> list[str]:
    """Each level's profile (`server_profile`) as a table; none for results from before it was counted."""
    levels = [lv for lv in res["levels"] if lv.get("profile")]
    if not levels:
        return []
    lines = [
        "where the server's time went (its own counters, GET /metrics), as shares of the time between the scrapes around each run:",
        "",
        "| C | decode | prefill | sampling | idle | other | decode steps | mean rows | decode step ms | keys read / needed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for lv in levels:
        p, sh = lv["profile"], lv["profile"]["shares"]
        lines.append(
            f"| {lv['concurrency']} | {_pct(sh['decode'])} | {_pct(sh['prefill'])} | {_pct(sh['sampling'])} | "
            f"{_pct(sh['idle'])} | {_pct(sh['other'])} | {p['decode_steps']} | {_num(p['mean_rows'], '.2f')} | "
            f"{_ms(p['decode_step_s'])} | {_num(p['keys_read_over_needed'], '.2f')} |"
        )
    return ["", *lines]


def ratio_lines(res: dict[str, Any]) -> list[str]:
    """Each target ratio this run measured, with the target and whether it is met; then one line naming
    those it could not measure and the --concurrency levels they need (never a figure without a value)."""
    out, unmeasured, levels = [], [], set()
    for key, _, num, den, _, _ in TARGETS:
        r = res["ratios"].get(key)
        if r is None:
            continue  # a results file from before this target existed
        if r["meets"] is None:
            unmeasured.append(r["what"])
            levels |= {num[1], den[1]}
            continue
        verdict = "met" if r["meets"] else "missed"
        out.append(f"{r['what']} = {r['value']:.2f} (serving target {r['target']}: {verdict})")
    if unmeasured:
        need = ",".join(map(str, sorted(levels)))
        out.append(f"not measured: {'; '.join(unmeasured)} (they need --concurrency {need})")
    return out


def report(res: dict[str, Any]) -> str:
    """The header, the table, the target ratios and the warnings, as printed."""
    short = [
        f"C={lv['concurrency']}: {lv['ours']['tokens']} of {lv['ours']['tokens_asked']} tokens asked received "
        f"(finish reasons {lv['ours']['finish_reasons']})"
        for lv in res["levels"]
        if lv["ours"]["tokens"] != lv["ours"]["tokens_asked"]
    ]
    if any(not lv["ours"]["exact_token_counts"] for lv in res["levels"]):
        short.append("the server sent chunks without logprobs.tokens: tokens were counted one per text chunk")
    notes = [*res["warnings"], *short]
    return (
        "\n".join(
            [
                *header(res),
                "",
                table(res),
                *profile_table(res),
                "",
                *ratio_lines(res),
                *(["", *(f"warning: {w}" for w in notes)] if notes else []),
            ]
        )
        + "\n"
    )


def write_json(res: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(res, indent=2) + "\n")
    return p


def plot_serving(res: dict[str, Any], path: str | Path) -> Path:
    """Two panels: tokens/s of ours and of the HF static batch vs concurrency; TTFT and ITL p50/p99 (ms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    lv = res["levels"]
    cs = [x["concurrency"] for x in lv]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(cs, [x["ours"]["tokens_per_s"] for x in lv], "o-", label="nanogpt serve (streamed requests)")
    a.plot(
        cs, [x["hf_static"]["tokens_per_s"] for x in lv], "s--", label=f"{PEER_NAME} generate, static batch"
    )
    bounds = [x.get("bound", {}).get("tokens_per_s") for x in lv]
    if any(b is not None for b in bounds):
        dtype = res["bound"]["dtype"]
        a.plot(
            cs, [b if b is not None else float("nan") for b in bounds], "k:", label=f"memory bound ({dtype})"
        )
    a.set_xlabel("concurrency C (clients; HF: batch size)")
    a.set_ylabel("tokens/s (all generated tokens / wall time)")
    a.set_title("throughput")
    a.set_ylim(bottom=0)
    for key, style, label in (
        ("ttft_p50_s", "o-", "TTFT p50"),
        ("ttft_p99_s", "o:", "TTFT p99"),
        ("itl_p50_s", "s-", "ITL p50"),
        ("itl_p99_s", "s:", "ITL p99"),
    ):
        ys = [x["ours"][key] * 1000 if x["ours"][key] is not None else float("nan") for x in lv]
        b.plot(cs, ys, style, label=label)
    b.set_xlabel("concurrency C")
    b.set_ylabel("ms")
    b.set_yscale("log")
    b.yaxis.set_major_formatter(ScalarFormatter())
    b.set_title("nanogpt serve latency")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = res["machine"]
    fig.suptitle(
        f"nanogpt bench --serve: {m['cpu']}, {res['settings']['threads']} threads, "
        f"load {res['load_average']['start'][0]:.2f} at start"
        + (" (figures taken under load)" if res["load_average"]["start"][0] > LOAD_LIMIT else ""),
        fontsize=9,
    )
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
