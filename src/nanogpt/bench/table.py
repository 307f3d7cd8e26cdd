"""The card's benchmark table, row by row: the timed rows as data, the other rows computed.

A timed row is a `Workload` (`bench.measure`): what it runs on our `Runner` and on the peer's, and the rows
its seconds per run fill. `timed_workloads` lists them in the table's order; `int8_workloads` is the
`--dtype int8` table's list. The remaining rows are counts (`size_rows`), single measurements
(`accuracy_row`, `memory_rows`) and ratios of rows already measured (`efficiency_rows`; `int8_bound_rows`
for the int8 table's three decodes).

    rows = [row for w in timed_workloads(ours, peer, inp) for row in run_workloads([w], timing)]
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from nanogpt.bench.measure import (
    MIB,
    NEW_TOKENS,
    PROMPT_TOKENS,
    Row,
    RowSpec,
    Work,
    Workload,
    activation_estimate,
    decode_step_bytes,
    forward_flops_per_token,
    memory_bound_tokens_per_s,
)
from nanogpt.bench.workloads import Inputs, Runner, overlap_stride
from nanogpt.config import ModelConfig

# --- the timed rows -------------------------------------------------------------------------------------


def _both(
    label: str, ours: Runner, peer: Runner | None, run: Callable[[Runner], Work], *rows: RowSpec
) -> Workload:
    """A workload doing `run` on our runner and, when there is one, on the peer's."""
    return Workload(label, run(ours), run(peer) if peer is not None else None, rows)


def timed_workloads(ours: Runner, peer: Runner | None, inp: Inputs) -> list[Workload]:
    """Training step, forward pass, decode, time to first token and the two evals, in the table's order."""
    tokens, shape = inp.batch * inp.seq, f"batch {inp.batch} x {inp.seq}"
    train = f"Training throughput: forward + backward + AdamW step, {shape}"
    forward = f"Forward-only throughput: logits at every position, no autograd, {shape}"
    new = inp.new_tokens
    decode = f"Decode: batch 1, KV cache, greedy, {PROMPT_TOKENS}-token prompt, {new} new tokens (prefill included)"
    latency = f"Generation latency per {NEW_TOKENS} tokens (the decode runs)"
    ttft = f"Time to first token: {inp.seq}-token prompt, prefill + one greedy pick"

    def decode_run(r: Runner) -> Work:
        return partial(r.generate, inp.decode_prompt, new)

    def first_token(r: Runner) -> Work:
        return partial(r.generate, inp.prompt, 1)

    # (what runs, the work of a runner, the rows its timings fill): one Workload each, ours beside the peer
    table: list[tuple[str, Callable[[Runner], Work], tuple[RowSpec, ...]]] = [
        (
            "training step (forward + backward + AdamW)",
            lambda r: r.train,
            (
                RowSpec("train_tokens_per_s", train, "tokens/s", tokens),
                RowSpec("train_batches_per_s", train, "batches/s"),
            ),
        ),
        (
            "forward pass",
            lambda r: r.forward,
            (
                RowSpec("forward_tokens_per_s", forward, "tokens/s", tokens),
                RowSpec("forward_batches_per_s", forward, "batches/s"),
            ),
        ),
        (
            "decode (batch 1, KV cache, greedy)",
            decode_run,
            # the same runs per 100 tokens: the card's latency is its decode speed inverted
            (
                RowSpec("decode_tokens_per_s", decode, "tokens/s", new),
                RowSpec("latency_per_100_tokens_s", latency, "s", NEW_TOKENS / new),
            ),
        ),
        ("time to first token", first_token, (RowSpec("ttft_s", ttft, "s"),)),
    ]
    return [_both(label, ours, peer, work, *rows) for label, work, rows in table] + eval_workloads(
        ours, peer, inp
    )


def eval_workloads(ours: Runner, peer: Runner | None, inp: Inputs) -> list[Workload]:
    """Sliding-window perplexity at stride = context and with overlapping windows."""
    seq, stride, tail = inp.seq, overlap_stride(inp.seq), f"{inp.n_eval} tokens, batch {inp.batch}"
    at_context = f"Perplexity evaluation: sliding_window_nll, context = stride = {seq}, {tail}"
    overlap = (
        f"Perplexity evaluation, overlapping windows: context {seq}, stride {stride} (each scored token "
        f"has >= {seq - stride} tokens of history), {tail}"
    )
    return [
        _both(
            "perplexity evaluation",
            ours,
            peer,
            lambda r: partial(r.mean_nll, seq),
            RowSpec("eval_tokens_per_s", at_context, "tokens/s", inp.n_eval),
        ),
        _both(
            "perplexity evaluation, overlapping windows",
            ours,
            peer,
            lambda r: partial(r.mean_nll, stride),
            RowSpec("eval_overlap_tokens_per_s", overlap, "tokens/s", inp.n_eval),
        ),
    ]


def int8_decode_group(int8: Runner, bf16: Runner, fp32: Runner, inp: Inputs) -> list[Workload]:
    """`--dtype int8`'s decode rows: the int8 copy, then the same model in bf16 and in fp32. Timed as one
    group (`run_workloads`), so the three alternate run by run."""
    new = inp.new_tokens
    what = f"Decode: batch 1, KV cache, greedy, {PROMPT_TOKENS}-token prompt, {new} new tokens"
    rows = (
        (int8, "decode_tokens_per_s", "int8 weights"),
        (bf16, "decode_bf16_tokens_per_s", "bf16 (the same model, bf16 weight copies)"),
        (fp32, "decode_fp32_tokens_per_s", "fp32"),
    )
    return [
        Workload(
            key,
            partial(r.generate, inp.decode_prompt, new),
            None,
            (RowSpec(key, f"{what}, {which}", "tokens/s", new),),
        )
        for r, key, which in rows
    ]


def int8_workloads(int8: Runner, inp: Inputs) -> list[Workload]:
    """`--dtype int8`'s rows after its decode: time to first token and the evals, of the int8 copy alone."""
    ttft = RowSpec("ttft_s", f"Time to first token, int8: {inp.seq}-token prompt", "s")
    first = Workload("time to first token", partial(int8.generate, inp.prompt, 1), None, (ttft,))
    return [first, *eval_workloads(int8, None, inp)]


def int8_ratio_row(rows: list[Row]) -> Row:
    """int8's decode speed over bf16's, from the rows of `int8_decode_group` (medians)."""
    speed = {r.key: r.value for r in rows}
    q, b = speed["decode_tokens_per_s"], speed["decode_bf16_tokens_per_s"]
    ratio = q / b if q is not None and b else None
    return Row("decode_int8_over_bf16", "Decode speed of int8 over bf16 (medians)", ratio, "x")


# --- the rows computed from counts, single measurements and other rows -----------------------------------


def size_rows(cfg: ModelConfig, n_total: int, n_unique: int, peer_unique: int | None) -> list[Row]:
    """Parameter counts (the card's tied-twice count and the unique one) and weight memory."""
    tied = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
    rows = [
        Row(
            "params_total",
            "Model size: parameters, tied matrix counted twice (the card's count)",
            n_total,
            "params",
            peer=peer_unique + tied if peer_unique else None,
        ),
        Row("params_unique", "Model size: unique parameters", n_unique, "params", peer=peer_unique),
    ]
    for name, nb in (("fp32", 4), ("fp16", 2)):
        rows.append(
            Row(
                f"weights_{name}_mib",
                f"Weight memory {name}: unique tensors",
                n_unique * nb / MIB,
                "MiB",
                peer=peer_unique * nb / MIB if peer_unique else None,
                higher_is_better=False,
            )
        )
    return rows


def nll_delta(low: Runner, fp32: Runner, stride: int) -> float:
    """What low precision costs: |mean NLL of the eval tokens in low precision - the same in fp32|."""
    return abs(low.mean_nll(stride) - fp32.mean_nll(stride))


def accuracy_row(dtype: str, delta: float, peer_delta: float | None, seq: int) -> Row:
    """The accuracy cost of `dtype` (bf16/fp16 autocast, or int8 weights) against fp32, in nats."""
    how = "with int8 weights" if dtype == "int8" else f"in {dtype}"
    what = f"Accuracy cost of {dtype}: absolute difference of the mean NLL {how} and in fp32"
    return Row(
        "low_precision_nll_delta",
        f"{what}, eval tokens at stride {seq}",
        delta,
        "nats",
        peer=peer_delta,
        higher_is_better=False,
    )


def memory_rows(
    cfg: ModelConfig, batch: int, seq: int, dtype: str, act: dict[str, Any], act_peer: dict[str, Any] | None
) -> list[Row]:
    """Activation memory: measured, and the analytic estimate beside it."""
    bpe = 4 if dtype == "fp32" else 2
    return [
        Row(
            "activation_mib",
            f"Activation memory, measured ({act['method']}), forward + backward, batch {batch} x {seq}",
            act["activation"] / MIB,
            "MiB",
            peer=act_peer["activation"] / MIB if act_peer else None,
            higher_is_better=False,
        ),
        Row(
            "activation_estimate_mib",
            "Activation memory, analytic estimate (`activation_estimate`; the peer's: a stock GPT-2)",
            activation_estimate(cfg, batch, seq, bpe) / MIB,
            "MiB",
            peer=activation_estimate(cfg, batch, seq, bpe, stock=True) / MIB if act_peer else None,
            higher_is_better=False,
        ),
    ]


def efficiency_rows(
    rows: list[Row], roof: dict[str, Any], cfg: ModelConfig, n_unique: int, seq: int, dtype: str, new: int
) -> list[Row]:
    """MFU of training and forward, and decode's share of its memory bound, against the ceilings measured
    on this machine (`roof`, `measure_roofline`'s), from the rate rows already in `rows`."""
    row = {r.key: r for r in rows}
    peak = roof["peak_gflops"] * 1e9
    fpt = forward_flops_per_token(cfg, n_unique, seq)
    out = []
    for key, mult, label in (("train", 3.0, "training"), ("forward", 1.0, "forward")):
        r = row[f"{key}_tokens_per_s"]
        out.append(
            Row(
                f"mfu_{key}",
                f"MFU {label}: model FLOP/s over the measured matmul peak ({roof['peak_gflops']:.0f} GFLOP/s)",
                r.value * mult * fpt / peak if r.value is not None else None,
                "fraction",
                peer=r.peer * mult * fpt / peak if r.peer else None,
            )
        )
    out.append(bound_row("decode_bandwidth_fraction", row["decode_tokens_per_s"], roof, cfg, dtype, new))
    return out


def decode_positions(new: int) -> int:
    """The mean keys a step of the decode row reads: its prompt, then half of its new tokens."""
    return PROMPT_TOKENS + new // 2


def bound_row(key: str, rate: Row, roof: dict[str, Any], cfg: ModelConfig, dtype: str, new: int) -> Row:
    """A batch-1 decode rate row (`rate`, ours and the peer's) as a share of its memory bound: the tokens/s
    at which the bytes a step must read (`decode_step_bytes`, in `dtype`) stream at the measured copy
    bandwidth. The peer is measured against the same bound: the least either model reads."""
    positions = decode_positions(new)
    step = decode_step_bytes(cfg, dtype, [positions])
    bound = memory_bound_tokens_per_s(1, step, roof["copy_gb_s"])
    metric = (
        f"Decode {dtype}, share of its memory bound: {step / MIB:.1f} MiB read per token ({dtype} weights as "
        f"the decode path reads them + KV cache at {positions} positions); bound {bound:,.0f} tokens/s at "
        f"the measured copy bandwidth ({roof['copy_gb_s']:.1f} GB/s)"
    )
    value = rate.value / bound if rate.value is not None else None
    return Row(key, metric, value, "fraction", peer=rate.peer / bound if rate.peer else None)


def int8_bound_rows(decode: list[Row], roof: dict[str, Any], cfg: ModelConfig, new: int) -> list[Row]:
    """Each decode of `int8_decode_group` (int8, bf16, fp32) as a share of its own memory bound."""
    row = {r.key: r for r in decode}
    return [
        bound_row("decode_bandwidth_fraction", row["decode_tokens_per_s"], roof, cfg, "int8", new),
        bound_row("decode_bf16_bandwidth_fraction", row["decode_bf16_tokens_per_s"], roof, cfg, "bf16", new),
        bound_row("decode_fp32_bandwidth_fraction", row["decode_fp32_tokens_per_s"], roof, cfg, "fp32", new),
    ]
