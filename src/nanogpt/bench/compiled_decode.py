"""The compiled decode rows: batch-1 greedy decode through `Decoder(..., compile=True)` beside the eager one.

`nanogpt bench --compiled-decode --preset card` times the table's decode workload (`infer.generate
.decode_steps`: a PROMPT_TOKENS-token prompt, NEW_TOKENS greedy tokens, prefill included) eager and compiled,
alternating run by run so that load hits both alike. Before the timed runs, one compiled step in a fresh
dynamo state measures the compilation on its own (whether inductor's on-disk cache answered is recorded: a
second process on the same machine compiles faster). From the two speeds and that time comes the
break-even: how many new tokens one `sample --compile` call must make before compiling pays.

    result = compiled_decode(model, "fp32", repeats=5)
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch._dynamo.utils import counters

from nanogpt.bench.measure import NEW_TOKENS, PROMPT_TOKENS, Stat, machine_info
from nanogpt.infer.generate import decode_steps
from nanogpt.infer.sampling import SamplingParams
from nanogpt.model.gpt import NanoGPTLMHeadModel


def _decode_seconds(
    model: NanoGPTLMHeadModel, prompt: list[int], new: int, dtype: str, compile: bool
) -> float:
    """Seconds of one greedy decode of `new` tokens after `prompt`, prefill included (the decode row's work)."""
    params = SamplingParams(max_tokens=new, temperature=0)
    start = time.perf_counter()
    made = sum(1 for _ in decode_steps(model, prompt, params, dtype=dtype, compile=compile))
    seconds = time.perf_counter() - start
    assert made == new, f"the decode made {made} tokens, not {new}"
    return seconds


def _compile_seconds(model: NanoGPTLMHeadModel, prompt: list[int], dtype: str) -> dict[str, Any]:
    """A fresh compilation, timed: a decode of 2 tokens compiled minus the same decode eager."""
    torch._dynamo.reset()
    hits = counters["inductor"]["fxgraph_cache_hit"]
    compiled = _decode_seconds(model, prompt, 2, dtype, compile=True)
    eager = _decode_seconds(model, prompt, 2, dtype, compile=False)
    return {
        "seconds": compiled - eager,
        "inductor_cache": "hit" if counters["inductor"]["fxgraph_cache_hit"] > hits else "miss",
    }


def compiled_decode(
    model: NanoGPTLMHeadModel, dtype: str, repeats: int, new_tokens: int | None = None
) -> dict[str, Any]:
    """Eager and compiled batch-1 decode of the same greedy tokens, timed alternately; the compile time apart."""
    cfg = model.config
    new = new_tokens or max(1, min(NEW_TOKENS, cfg.context_length - PROMPT_TOKENS))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (PROMPT_TOKENS,), generator=g).tolist()
    load_start = os.getloadavg()
    _decode_seconds(model, prompt, new, dtype, compile=False)  # warm-up: the decode weight copies
    compile_time = _compile_seconds(model, prompt, dtype)
    graphs = counters["stats"]["unique_graphs"]
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(repeats):
        order = (False, True) if r % 2 == 0 else (True, False)  # neither always runs first
        for compile in order:
            times["compiled" if compile else "eager"].append(
                _decode_seconds(model, prompt, new, dtype, compile)
            )
    stats = {k: Stat.of(v) for k, v in times.items()}
    speed = {k: new / s.median for k, s in stats.items()}
    per_token_saved = 1 / speed["eager"] - 1 / speed["compiled"]
    return {
        "config": cfg.to_dict(),
        "dtype": dtype,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": new,
        "repeats": repeats,
        "tokens_per_s": {
            k: {"median": speed[k], "min": new / s.max, "max": new / s.min} for k, s in stats.items()
        },
        "compiled_over_eager": speed["compiled"] / speed["eager"],
        "compile": compile_time,
        # new tokens one call must make before the compilation has paid for itself (None: it never does)
        "break_even_tokens": compile_time["seconds"] / per_token_saved if per_token_saved > 0 else None,
        "graphs_recompiled": counters["stats"]["unique_graphs"] - graphs,  # 0: one graph served every run
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "machine": machine_info(torch.device("cpu")),
    }


def markdown(res: dict[str, Any]) -> str:
    """The rows as a small markdown table, with the compile time and the break-even under it."""
    tps, c = res["tokens_per_s"], res["compile"]
    lines = [
        f"Decode: batch 1, KV cache, greedy, {res['prompt_tokens']}-token prompt, {res['new_tokens']} new tokens "
        f"(prefill included), {res['dtype']}, median of {res['repeats']} runs each, alternating",
        "",
        "| decode | tokens/s | min..max |",
        "|---|---|---|",
    ]
    for k in ("eager", "compiled"):
        lines.append(f"| {k} | {tps[k]['median']:.1f} | {tps[k]['min']:.1f}..{tps[k]['max']:.1f} |")
    even = res["break_even_tokens"]
    lines += [
        "",
        f"compiled / eager: {res['compiled_over_eager']:.2f}x; compilation (first step): {c['seconds']:.1f} s "
        f"(inductor cache {c['inductor_cache']}); pays after "
        + (f"{even:.0f} new tokens in one call" if even is not None else "never (compiled is not faster)"),
        f"load average {res['load_average']['start'][0]:.2f} at the start, "
        f"{res['load_average']['end'][0]:.2f} at the end, {res['machine']['cores']} cores",
    ]
    if res["graphs_recompiled"]:
        lines.append(f"warning: {res['graphs_recompiled']} graphs recompiled during the timed runs")
    return "\n".join(lines) + "\n"
