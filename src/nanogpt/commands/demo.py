"""The main job, end to end on a fresh machine with no network: `nanogpt demo`.

Prepares the builtin Shakespeare corpus, trains a CPU-sized model for a bounded time (progress bar),
measures held-out perplexity before and after training with the sliding-window evaluator, writes
`loss.png`, exports a Hugging Face folder and loads it back through `transformers` (when installed),
and prints samples for the card's three widget prompts. Figures land in `RUN/demo.json`; the last line is
the command that opens the model in the browser playground (`nanogpt serve`, docs/playground.md).

    nanogpt demo --minutes 8
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from nanogpt.config import PRESETS, RECIPES, TrainConfig, preset, warmup_for
from nanogpt.errors import ArgumentParser, UserError, install_command
from nanogpt.folders import claim
from nanogpt.infer.sampling import SamplingParams

WIDGET_PROMPTS = ("Once upon a time", "The capital of France is", "In the field of machine learning,")


@dataclass
class DemoResult:
    run_dir: Path
    preset: str
    steps: int
    tokens: int
    train_tokens_per_s: float
    init_val_ppl: float
    final_val_ppl: float
    final_val_bpb: float
    val_tokens_scored: int
    samples: dict[str, str] = field(default_factory=dict)
    export_dir: Path | None = None
    hf_sample: str | None = None
    busy_note: str | None = None  # set when a busy machine, a slower CPU or the time cap held training back


# The demo trains with its preset's recipe (config.RECIPES: chosen by the A/B runs in docs/demo.md);
# `demo_train_config` replaces its iterations and evaluations by what fits the time budget.
# preset -> (seconds per training step, held-out perplexity after the default 8 minutes), measured on the
# idle REFERENCE_CPU: what a run on a busy machine or a slower CPU is compared against (docs/demo.md, 3 seeds)
REFERENCE_CPU = "the 2-core AMD EPYC (AVX2)"
IDLE: dict[str, tuple[float, str]] = {"tiny": (0.77, "144 (143.7 ± 3.9)")}
EVALS = 10  # held-out evaluations (and best/ checkpoints) per run
OVERHEAD = 0.03  # logging, checkpoints and the progress bar, as a share of the step time (docs/demo.md)


def seconds_per_iter(model_cfg: Any, cfg: TrainConfig, repeats: int = 2) -> float:
    """Time a few real training steps of the recipe (its batch, dtype and optimizer) to size the run."""
    from nanogpt.kernels.device import autocast
    from nanogpt.model.gpt import NanoGPTLMHeadModel
    from nanogpt.train.optim import make_optimizer, optimizer_step

    torch.manual_seed(cfg.seed)
    cpu = torch.device("cpu")
    model = NanoGPTLMHeadModel(model_cfg).train()
    opt = make_optimizer(model, cfg, cpu)
    x = torch.randint(0, model_cfg.vocab_size, (cfg.batch_size, model_cfg.context_length))
    times = []
    for _ in range(repeats + 1):  # the first step warms up allocators and kernels
        t = time.perf_counter()
        for _ in range(cfg.grad_accum_steps):
            with autocast(cpu, cfg.dtype):
                loss = model(x, targets=x)
            loss.backward()
        optimizer_step(model, opt, cfg.learning_rate, cfg.grad_clip)
        times.append(time.perf_counter() - t)
    return min(times[1:])


def demo_train_config(
    s_per_iter: float,
    minutes: float,
    seed: int,
    iters: int | None = None,
    preset_name: str = "tiny",
    **changes: Any,
) -> TrainConfig:
    """The preset's recipe (with `changes`) and as many iterations as fit the budget.

    An eval batch costs about a third of a training step (forward only); `iters` fixes the number of
    iterations instead (the time budget then only caps the run).
    """
    recipe = {**RECIPES[preset_name], **changes}
    budget = minutes * 60
    steps_in_budget = budget / s_per_iter
    eval_share = EVALS * recipe["eval_iters"] / 3 / steps_in_budget
    iters = iters or max(20, int(steps_in_budget / (1 + OVERHEAD + eval_share)))
    recipe["eval_iters"] = min(recipe["eval_iters"], max(2, iters))  # fewer only for a few-step smoke run
    sized = {
        "warmup_iters": warmup_for(iters),  # never most of a short run
        "max_iters": iters,
        "max_time": budget,  # a hard stop if the machine is slower than the calibration said
        "eval_interval": max(10, iters // EVALS),
        "log_interval": 5,
        "seed": seed,
    }
    return TrainConfig(**{**recipe, **sized})


@dataclass(frozen=True)
class MachineLoad:
    """How busy the machine was while the demo trained: the load average and the measured step time
    against the step time of the idle reference CPU (IDLE)."""

    load: float | None  # 1-minute load average (None where the OS has none)
    cores: int
    s_per_iter: float
    idle_s_per_iter: float | None

    @staticmethod
    def now(s_per_iter: float, preset_name: str) -> MachineLoad:
        try:
            load: float | None = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = None
        idle = IDLE.get(preset_name)
        return MachineLoad(load, os.cpu_count() or 1, s_per_iter, idle[0] if idle else None)

    @property
    def busy(self) -> bool:
        """More runnable work than cores: the run shared its CPU. The load is read as training ends, so it
        counts the run's own threads (up to the cores): only half a core more than that is someone else."""
        return self.load is not None and self.load > self.cores + 0.5

    @property
    def slow(self) -> bool:
        """A step well over the reference CPU's: a busy machine, or a slower CPU."""
        return self.idle_s_per_iter is not None and self.s_per_iter > 1.5 * self.idle_s_per_iter

    def describe(self) -> str:
        load = "no load figure" if self.load is None else f"load average {self.load:.1f} on {self.cores} cores"
        idle = f" against ~{self.idle_s_per_iter:.2f} on the reference CPU" if self.idle_s_per_iter else ""
        return f"{load}; a training step took {self.s_per_iter:.2f} s{idle}"


def busy_note(
    machine: MachineLoad, preset_name: str, minutes: float, steps: int, planned: int, ppl: float | None = None
) -> str | None:
    """What to tell the user when a busy machine, a slower CPU or the time cap held the run back; None otherwise."""
    capped = steps < planned
    if not (machine.busy or machine.slow or capped):
        return None
    if machine.busy:
        why = "this machine was busy"
    elif machine.slow:
        why = "this CPU trains slower than the reference CPU"
    else:
        why = "training ran slower than measured"
    head = f"note: {why} ({machine.describe()})"
    if capped:
        head += f", so the {minutes:g}-minute cap stopped training at step {steps} of {planned} planned"
    idle = IDLE.get(preset_name)
    if idle is not None and minutes == 8:
        reached = f"perplexity {ppl:,.1f} here; " if ppl is not None else ""
        head += (
            f". {reached}an idle run of 8 minutes on {REFERENCE_CPU} reaches held-out perplexity ~{idle[1]} "
            "(docs/demo.md)"
        )
    more = "give it more time with --minutes"
    return f"{head}; {'rerun on a quieter machine, or ' + more if machine.busy else more}"


def run_demo(
    out: Path,
    data_dir: Path,
    preset_name: str,
    minutes: float,
    seed: int,
    export: bool,
    progress: bool = True,
    force: bool = False,
    iters: int | None = None,
    eval_tokens: int = 40_000,
    changes: dict[str, Any] | None = None,
    model_changes: dict[str, Any] | None = None,
) -> DemoResult:
    from nanogpt.data.prepare import prepare
    from nanogpt.train.checkpoint import load_model
    from nanogpt.train.loop import train

    claim(out, "demo", force=force)  # before any work: only an earlier demo's folder is replaced
    say = print if progress else (lambda *a, **k: None)
    say("== 1/5 prepare the builtin corpus (Shakespeare, offline)")
    prep = prepare("builtin", data_dir, verbose=progress)
    say(prep.summary())

    model_cfg = replace(preset(preset_name), **(model_changes or {}))
    sizing = (minutes, seed, iters, preset_name)
    spi = seconds_per_iter(model_cfg, demo_train_config(1.0, *sizing, **(changes or {})))
    cfg = demo_train_config(spi, *sizing, **(changes or {}))
    say(
        f"== 2/5 train preset {preset_name!r} for ~{minutes:g} min: {spi:.2f} s/iter measured -> {cfg.max_iters} iterations"
    )
    res = train(model_cfg, cfg, data_dir, out, progress=progress, force=force, purpose="demo")  # from scratch
    # the step time training really had (evaluations excluded), and the load it ran under
    trained_spi = cfg.batch_size * model_cfg.context_length / res.tokens_per_s if res.tokens_per_s else spi
    machine = MachineLoad.now(max(spi, trained_spi), preset_name)
    note = busy_note(machine, preset_name, minutes, res.steps, cfg.max_iters)
    if note:
        say(note)

    say("== 3/5 held-out perplexity (sliding window over the val split)")
    model = load_model(out)  # best/ (lowest val loss)
    init, final = held_out(model, data_dir, eval_tokens, seed, progress)
    say(
        f"val perplexity: {init.perplexity:,.1f} at initialisation -> {final.perplexity:,.1f} after training "
        f"({final.bits_per_byte:.3f} bits/byte, {final.tokens_scored:,} tokens)"
    )
    params = SamplingParams(max_tokens=60, seed=seed)
    say(f"== 4/5 samples (temperature {params.temperature}, top-k {params.top_k})")
    samples = widget_samples(model, params, say)

    note = busy_note(machine, preset_name, minutes, res.steps, cfg.max_iters, final.perplexity)
    result = DemoResult(
        run_dir=out,
        preset=preset_name,
        steps=res.steps,
        tokens=res.tokens,
        train_tokens_per_s=res.tokens_per_s,
        init_val_ppl=init.perplexity,
        final_val_ppl=final.perplexity,
        final_val_bpb=final.bits_per_byte,
        val_tokens_scored=final.tokens_scored,
        samples=samples,
        busy_note=note,
    )
    if export:
        say("== 5/5 export to Hugging Face format and load it back with transformers")
        result.export_dir, result.hf_sample = export_and_reload(out, seed)
        if result.export_dir is not None:
            say(f"exported to {result.export_dir} (the card's remote-code format)")
        if result.hf_sample is not None:
            say(f"transformers generate(): {result.hf_sample}")
    (out / "demo.json").write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
    return result


def held_out(model: Any, data_dir: Path, eval_tokens: int, seed: int, progress: bool) -> tuple[Any, Any]:
    """The sliding-window score of the val split at initialisation (seeded) and of the trained `model`."""
    from nanogpt.infer.evaluate import sliding_window_nll, split_tokens
    from nanogpt.model.gpt import NanoGPTLMHeadModel

    val = split_tokens(data_dir, "val", max_tokens=eval_tokens)
    torch.manual_seed(seed)
    # two evaluations of minutes each on a busy CPU: the same bar as `nanogpt eval`
    init = sliding_window_nll(NanoGPTLMHeadModel(model.config), val, batch_size=8, progress=progress)
    return init, sliding_window_nll(model, val, batch_size=8, progress=progress)


def widget_samples(model: Any, params: SamplingParams, say: Any) -> dict[str, str]:
    """A sample for each of the card's three widget prompts, printed as it is made."""
    from nanogpt.data.tokenizer import get_tokenizer
    from nanogpt.infer.generate import generate

    tok, samples = get_tokenizer(), {}
    for prompt in WIDGET_PROMPTS:
        samples[prompt] = prompt + tok.decode(list(generate(model, tok.encode(prompt), params)))
        say(f"--- {samples[prompt]}\n")
    return samples


def export_and_reload(run: Path, seed: int) -> tuple[Path | None, str | None]:
    """Export the run (remote-code format) and, if transformers is installed, run the card's snippet on it."""
    try:
        from nanogpt.export.hf import export
    except ImportError as e:
        print(f"(export skipped: {e})")
        return None, None
    dst = run / "hf"
    export(run, dst, fmt="remote-code")  # the train step cleared the demo folder: hf/ is new
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        print(f"exported to {dst}; to load it back, install transformers: `{install_command('hf')}`")
        return dst, None
    tokenizer = AutoTokenizer.from_pretrained(dst, trust_remote_code=True)  # our own export: no prompt
    model = AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True)
    torch.manual_seed(seed)
    inputs = tokenizer(WIDGET_PROMPTS[0], return_tensors="pt")
    params = SamplingParams()
    outputs = model.generate(
        **inputs,
        max_length=40,
        temperature=params.temperature,
        top_k=params.top_k,
        do_sample=True,
        pad_token_id=tokenizer.eos_token_id,
    )
    return dst, str(tokenizer.decode(outputs[0], skip_special_tokens=True))


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="nanogpt demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--minutes",
        type=float,
        default=8.0,
        help="training time budget (default 8); on a 2-core CPU the demo takes 3-5 minutes more: preparing the "
        "corpus, two held-out scores, the export",
    )
    p.add_argument("--preset", default="tiny", choices=[k for k in PRESETS if k != "card"], help="model size")
    p.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="run folder (an earlier demo's is replaced)"
    )
    p.add_argument("--force", action="store_true", help="replace --out even if it is not an earlier demo")
    p.add_argument(
        "--data", type=Path, default=Path("data/builtin"), help="where the builtin corpus is prepared"
    )
    p.add_argument(
        "--iters", type=int, help="train exactly this many iterations (--minutes then only caps time)"
    )
    p.add_argument("--eval-tokens", type=int, default=40_000, help="val tokens scored for perplexity")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-export", action="store_true", help="skip the Hugging Face export")
    args = p.parse_args(argv)
    if args.minutes <= 0:
        raise UserError(f"--minutes {args.minutes} must be positive")
    t = time.perf_counter()
    r = run_demo(
        args.out,
        args.data,
        args.preset,
        args.minutes,
        args.seed,
        export=not args.no_export,
        iters=args.iters,
        eval_tokens=args.eval_tokens,
        force=args.force,
    )
    print(
        f"\ndemo done in {(time.perf_counter() - t) / 60:.1f} min: {r.steps} steps, {r.tokens:,} tokens at "
        f"{r.train_tokens_per_s:,.0f} tokens/s; held-out perplexity {r.init_val_ppl:,.0f} -> {r.final_val_ppl:,.1f}; "
        f"run folder {r.run_dir} (loss.png, demo.json)"
        + (f"; Hugging Face export {r.export_dir}" if r.export_dir else ""),
        file=sys.stderr,
    )
    if r.busy_note:
        print(r.busy_note, file=sys.stderr)  # again at the end, where the figures are read
    print(playground_line(r.run_dir), file=sys.stderr)  # last: what to do next with the model
    return 0


def playground_line(run: Path) -> str:
    """The one command that opens the model just trained in the browser playground (`nanogpt serve` at /)."""
    return f"see how it works: nanogpt serve --model {run}  then open http://127.0.0.1:8000/ (the playground)"
