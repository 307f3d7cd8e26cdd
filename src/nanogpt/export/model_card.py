"""The exported folder's README.md: the model card's layout, with numbers measured for this checkpoint.

Parameter counts come from the model itself; training facts (data, tokens seen, iterations, held-out
loss) come from the run folder's `log.jsonl` and `last/state.json` when they exist. A fact we cannot
read is left out, never guessed.

    facts = read_run_facts(Path("runs/demo/best"))
    text = render_model_card(cfg, facts, ParamCounts(52_990_464, 33_691_776), "gpt2", "exports/demo")
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanogpt.config import ModelConfig
from nanogpt.folders import STATE_JSON, RunFolder
from nanogpt.train.lineage import read_lineage, total_iterations

WIDGET_PROMPTS = [
    ("Once upon a time", "Story Beginning"),
    ("The capital of France is", "Factual Question"),
    ("In the field of machine learning,", "Technical Topic"),
]


@dataclass(frozen=True)
class ParamCounts:
    total: int  # the tied embedding counted twice, as the card's 52,990,464 does
    unique: int


@dataclass(frozen=True)
class RunFacts:
    """What the run folder says about training; None where it says nothing."""

    data: str | None = None  # a short description of the training data
    dataset_id: str | None = None  # a Hugging Face dataset id, for the YAML `datasets` list
    tokens_seen: int | None = None
    iterations: int | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    val_step: int | None = None
    stages: tuple[dict[str, Any], ...] = ()  # train.lineage: every stage that led here, oldest first
    held_out: dict[str, Any] | None = None  # a `nanogpt eval --json` result of this checkpoint


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _first(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def read_log(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a log.jsonl, skipping lines that do not parse (a run killed mid-write)."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def find_run_dir(checkpoint: Path) -> Path | None:
    """The run folder of a checkpoint (RUN/best -> RUN), or None for a bare checkpoint folder."""
    for d in (checkpoint, checkpoint.parent):
        if RunFolder(d).log.is_file() or RunFolder(d).has_checkpoint():
            return d
    return None


def _dict(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one: meta.json may lack a section or hold another type."""
    return value if isinstance(value, dict) else {}


def _data_facts(data_dir: Any) -> tuple[str | None, str | None]:
    if not isinstance(data_dir, str):
        return None, None
    meta = _read_json(Path(data_dir) / "meta.json")
    if meta is None:
        return None, None
    src = _dict(meta.get("source"))
    settings = _dict(src.get("settings"))
    spec = settings.get("source")  # `nanogpt prepare --source`: "builtin", a path, or "hf:ORG/NAME[:CONFIG]"
    dataset_id = _first(src, "dataset", "hf_dataset", "repo_id")
    if dataset_id is None and isinstance(spec, str) and spec.startswith("hf:"):
        dataset_id = spec.split(":")[1]
    name = dataset_id or spec or _first(src, "name", "path", "kind")
    tokens = (meta.get("splits") or {}).get("train", {}).get("tokens")
    desc = str(name) if name is not None else None
    if desc is not None and isinstance(tokens, int):
        desc += f" ({tokens:,} training tokens after GPT-2 BPE)"
    return desc, (str(dataset_id) if dataset_id else None)


def read_run_facts(checkpoint: Path) -> RunFacts:
    """Training facts for a checkpoint folder from its run's log.jsonl and last/state.json, if present."""
    run = find_run_dir(checkpoint)
    if run is None:
        return RunFacts()
    state = _read_json(RunFolder(run).resume_point / STATE_JSON) or {}
    evals = [r for r in read_log(RunFolder(run).log) if isinstance(r.get("val_loss"), (int, float))]
    if (
        checkpoint.name == RunFolder(run).best.name and evals
    ):  # best/ holds the weights of the lowest val loss
        ev = min(evals, key=lambda r: r["val_loss"])
    else:
        ev = evals[-1] if evals else {}
    val_loss = ev.get("val_loss")
    val_ppl = ev.get("val_ppl", math.exp(val_loss) if val_loss is not None else None)
    data, dataset_id = _data_facts(_first(state, "data_dir", "data", "data_path"))
    tokens = _first(state, "tokens_seen", "tokens")
    step = _first(state, "step", "iter", "iterations")
    stages = read_lineage(checkpoint)
    return RunFacts(
        stages=tuple(stages) if len(stages) > 1 or any("teacher" in s for s in stages) else (),
        data=data,
        dataset_id=dataset_id,
        tokens_seen=tokens if isinstance(tokens, int) else None,
        iterations=step if isinstance(step, int) else None,
        val_loss=float(val_loss) if val_loss is not None else None,
        val_ppl=float(val_ppl) if val_ppl is not None else None,
        val_step=ev.get("step"),
    )


def _front_matter(facts: RunFacts) -> str:
    lines = ["---", "language:", "- en", "license: mit", "tags:"]
    lines += [f"- {t}" for t in ("text-generation", "pytorch", "gpt", "transformers", "pre-ln", "causal-lm")]
    if facts.dataset_id:
        lines += ["datasets:", f"- {facts.dataset_id}"]
    lines += ["library_name: transformers", "pipeline_tag: text-generation", "metrics:", "- perplexity"]
    lines.append("widget:")
    for text, title in WIDGET_PROMPTS:
        lines += [f'- text: "{text}"', f'  example_title: "{title}"']
    return "\n".join(lines + ["---"])


def _usage(folder: str, fmt: str, max_length: int) -> str:
    remote = fmt == "remote-code"
    comment = "requires trust_remote_code for custom architecture" if remote else "a stock GPT2LMHeadModel"
    trust = ",\n    trust_remote_code=True\n" if remote else "\n"
    return f"""```python
from transformers import AutoTokenizer, AutoModelForCausalLM

# Load model and tokenizer ({comment})
tokenizer = AutoTokenizer.from_pretrained("{folder}")
model = AutoModelForCausalLM.from_pretrained(
    "{folder}"{trust})

# Generate text
prompt = "Once upon a time"
inputs = tokenizer(prompt, return_tensors="pt")
outputs = model.generate(
    **inputs,
    max_length={max_length},
    temperature=0.8,
    top_k=50,
    do_sample=True,
    pad_token_id=tokenizer.eos_token_id
)

text = tokenizer.decode(outputs[0], skip_special_tokens=True)
print(text)
```""" + (_tokenizer_question(folder) if remote else "")


def _tokenizer_question(folder: str) -> str:
    """Why the snippet's tokenizer line asks about custom code on transformers 5; the call that does not."""
    return f"""

**The tokenizer line asks a question on transformers 5.** `AutoTokenizer.from_pretrained` reads `config.json`
before the tokenizer's own files, and as that file names this model's custom code (`AutoModelForCausalLM`
finds the model through it), transformers 5 asks "Do you wish to run the custom code? [y/N]": a notebook
waits for the answer. Either answer loads the tokenizer ("N" adds a warning about a model of type
`nanogpt`); no layout of this folder avoids the question (transformers 4 never asks). This call loads the
same stock GPT-2 tokenizer silently:

```python
tokenizer = AutoTokenizer.from_pretrained("{folder}", trust_remote_code=True)
```

`GPT2TokenizerFast.from_pretrained("{folder}")` is silent too, and runs no code from the folder."""


# the remote-code model's Linear layers, as PEFT's `target_modules` names them (it has no defaults for `nanogpt`)
LORA_TARGETS = ("qkv_proj", "out_proj", "fc1", "fc2")


# the template's `<|endoftext|>` must stay one token while a typed one stays text (split_special_tokens, below)
CHAT_CALL = (
    'tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
    'tokenizer_kwargs={"split_special_tokens": False})'
)
CHAT_NOTE = (
    "the tokenizer carries nanogpt's chat template (`User:` / `Assistant:` turns, each ended by "
    "`<|endoftext|>`), the one a model fine-tuned by nanogpt on chat data was trained on. Ask for a reply's "
    f"prompt with `{CHAT_CALL}`: without that argument the tokenizer spells the template's end-of-turn token "
    "as 7 text tokens (see the note on `<|endoftext|>` below)."
)


def _tools(fmt: str) -> str:
    """The usage notes beyond the snippet: padding, training, attention weights, tracing, LoRA."""
    remote = fmt == "remote-code"
    lines = [
        "### Batches, fine-tuning and export",
        "",
        "- **Padding:** the tokenizer's `pad_token` is its end-of-text token `<|endoftext|>` (GPT-2 has none of "
        "its own; padded positions are masked out). For batched generation pad on the left: "
        '`tokenizer.padding_side = "left"`, then `tokenizer(prompts, padding=True, return_tensors="pt")`. A '
        "collator that drops padding from the loss by token id (`DataCollatorForLanguageModeling`) drops real "
        "end-of-text tokens too.",
        "- **Training:** `Trainer` (gradient accumulation included) and `model.gradient_checkpointing_enable()` "
        "work as with transformers' own models.",
        '- **Attention weights:** `output_attentions=True` needs the model loaded with `attn_implementation="eager"`.',
        "- **Export:** with `model.config.use_cache = False`, `torch.export.export`, "
        "`torch.onnx.export(..., dynamo=True)` and `torch.compile(model, fullgraph=True)` trace the whole model.",
        f"- **Chat:** {CHAT_NOTE}",
    ]
    if not remote:
        lines.append("- **LoRA (PEFT):** PEFT's default target modules for GPT-2 apply.")
        return "\n".join(lines)
    names = ", ".join(f'"{n}"' for n in LORA_TARGETS)
    lines += [
        "",
        "**LoRA (PEFT):** PEFT chooses default target modules by `model_type` and has none for `nanogpt`, so name "
        "them:",
        "",
        "```python",
        "from peft import LoraConfig, get_peft_model",
        "",
        f"config = LoraConfig(r=8, lora_alpha=16, target_modules=[{names}])",
        "model = get_peft_model(model, config)",
        "```",
        "",
        '`target_modules="all-linear"` selects the same four and leaves the tied output head alone.',
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class BenchTable:
    """A `nanogpt bench` table for the model card, as the command read it: the configuration it measured
    (checked against the exported model's) and the table's markdown (its rows, machine and settings)."""

    source: str  # where it was read from, named in a refusal
    config: dict[str, Any]
    markdown: str


def render_model_card(
    cfg: ModelConfig,
    facts: RunFacts,
    counts: ParamCounts,
    fmt: str,
    folder: str,
    benchmarks: str | None = None,
) -> str:
    """README.md text for an export in `fmt` ("remote-code" | "gpt2") found at `folder`.

    `benchmarks`: the markdown of a `nanogpt bench` table of this configuration (`BenchTable.markdown`).
    """
    short = "Pre-LN" if cfg.norm_position == "pre" else "Post-LN"
    out = [_front_matter(facts), "", f"# NanoGPT {counts.unique / 1e6:.1f}M - {short} Transformer", ""]
    out.append(
        "A GPT language model trained with the nanogpt PyTorch toolkit, "
        + (
            "exported as a Hugging Face folder loaded with `trust_remote_code=True`."
            if fmt == "remote-code"
            else "exported as a stock `GPT2LMHeadModel` (no remote code needed)."
        )
    )
    out += _architecture(cfg, counts)
    out += _training(facts)
    out += _benchmarks(benchmarks) if benchmarks else []
    out += [
        "",
        "## Usage",
        "",
        "### Basic Text Generation",
        "",
        _usage(folder, fmt, min(100, cfg.context_length)),
    ]
    out += ["", _tools(fmt)]
    out += _closing(cfg, counts)
    return "\n".join(out)


def _architecture(cfg: ModelConfig, counts: ParamCounts) -> list[str]:
    """The card's "Model Details" section: the shapes, and what the original card got wrong."""
    short = "Pre-LN" if cfg.norm_position == "pre" else "Post-LN"
    norm = f"{short[:-2]}LayerNorm ({short})"
    act = "exact GELU (erf)" if cfg.activation == "gelu" else "GELU, tanh approximation (GPT-2's)"
    tie = "tied to the token embedding" if cfg.tie_embeddings else "untied"
    params = (
        f"- **Parameters:** {counts.total:,} counting the tied embedding twice, {counts.unique:,} unique"
        if cfg.tie_embeddings
        else f"- **Parameters:** {counts.unique:,}"
    )
    return [
        "",
        "## Model Details",
        "",
        "### Architecture",
        "- **Model Type:** GPT (Decoder-only Transformer)",
        params,
        f"- **Architecture Pattern:** {norm}",
        f"- **Layers:** {cfg.n_layers} transformer blocks",
        f"- **Hidden Size:** {cfg.d_model}",
        f"- **Attention Heads:** {cfg.n_heads}",
        f"- **Feedforward Dimension:** {cfg.d_ff}, {act}",
        f"- **Context Length:** {cfg.context_length} tokens",
        f"- **Vocabulary Size:** {cfg.vocab_size:,} (GPT-2 tokenizer)",
        f"- **Output head:** {tie}; biases {'on' if cfg.bias else 'off'}; LayerNorm eps {cfg.ln_eps:g}",
        "",
        'Notes on the original card: its "43M unique with weight tying" is wrong (the card\'s exact '
        "configuration has 33,691,776 unique parameters: tying removes 50,257 x 384 = 19,298,688 from "
        "52,990,464), and standard GPT-2 is itself Pre-LN (`x = x + attn(ln(x))`), not Post-LN, which is why "
        "a Pre-LN nanogpt model can also be exported as a native GPT-2 checkpoint.",
    ]


def _training(facts: RunFacts) -> list[str]:
    """The "Training" section: only the facts the run folder states (none: no section)."""
    training = []
    if facts.data:
        training.append(f"- **Dataset:** {facts.data}")
    if facts.tokens_seen is not None:
        training.append(f"- **Training tokens seen:** {facts.tokens_seen:,}")
    if facts.iterations is not None:
        training.append(f"- **Iterations:** {facts.iterations:,}")
    if facts.val_loss is not None:
        at = f" at step {facts.val_step:,}" if isinstance(facts.val_step, int) else ""
        training.append(f"- **Held-out validation loss{at}:** {facts.val_loss:.4f}")
        if facts.val_ppl is not None:
            training.append(f"- **Held-out validation perplexity{at}:** {facts.val_ppl:.2f}")
    training += _stages(facts.stages)
    training += _held_out(facts.held_out)
    return ["", "### Training", "", *training] if training else []


def _loss(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


def _stages(stages: tuple[dict[str, Any], ...]) -> list[str]:
    """The stages that led to this checkpoint (base, then distillation...), and their iterations added up."""
    if not stages:
        return []
    rows = [
        "",
        "| stage | data | tokens | iterations | lr | batch | final train loss | final held-out loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for s in stages:
        data = _data_facts(s.get("data"))[0] or "-"
        tokens = f"{s['tokens']:,}" if isinstance(s.get("tokens"), int) else "-"
        rows.append(
            f"| {s.get('name', 'train')} | {data} | {tokens} | {int(s.get('iterations') or 0):,} | "
            f"{s.get('learning_rate', '-')} | {s.get('batch') or '-'} | {_loss(s.get('final_train_loss'))} | "
            f"{_loss(s.get('final_val_loss'))} |"
        )
        teacher = s.get("teacher")
        if isinstance(teacher, dict):
            notes.append(
                f"- **Teacher of the {s.get('name', 'distill')} stage:** `{teacher.get('spec')}` "
                f"({teacher.get('method')}, α = {teacher.get('alpha')} on the hard loss, T = "
                f"{teacher.get('temperature')})"
            )
    total = f"- **Total iterations across stages:** {total_iterations(list(stages)):,} (this checkpoint)"
    return [*rows, "", *notes, total]


def _held_out(result: dict[str, Any] | None) -> list[str]:
    """`nanogpt eval`'s figures for this checkpoint: perplexity and bits per byte on held-out text."""
    if not result or not isinstance(result.get("perplexity"), (int, float)):
        return []
    bpb = result.get("bits_per_byte")
    scored = result.get("tokens_scored")
    extra = f", {bpb:.4f} bits per byte" if isinstance(bpb, (int, float)) else ""
    extra += f" ({scored:,} tokens scored by `nanogpt eval`)" if isinstance(scored, int) else ""
    return [f"- **Held-out perplexity (`nanogpt eval`):** {result['perplexity']:.2f}{extra}"]


def _benchmarks(markdown: str) -> list[str]:
    """The "Performance Benchmarks" section around a `nanogpt bench` table."""
    return [
        "",
        "### Performance Benchmarks",
        "",
        "Measured with `nanogpt bench` at this configuration. Each row times exactly what its name says "
        "(training is forward + backward + AdamW; decode is batch 1 with the KV cache); speed does not "
        "depend on the weights' values.",
        "",
        markdown.rstrip(),
    ]


def _closing(cfg: ModelConfig, counts: ParamCounts) -> list[str]:
    """The tokenizer's end-of-text note, the limitations and the license."""
    return [
        "",
        "The tokenizer reads `<|endoftext|>` typed in a text as ordinary text (7 tokens), as the model saw it "
        "in training: its `tokenizer_config.json` sets `split_special_tokens`. Token 50256 only ever ends a "
        "document; to put it in an input, add `tokenizer.eos_token_id` to the ids.",
        "",
        "## Limitations",
        "",
        f"- **Context length:** limited to {cfg.context_length} tokens",
        f"- **Size:** {counts.unique / 1e6:.1f}M unique parameters is small compared to modern LLMs",
        "- **No instruction tuning:** a base language model, not instruction-tuned",
        "- **Reliability:** outputs may be wrong or biased; validate them before any use that matters",
        "",
        "## License",
        "",
        "MIT License.",
        "",
    ]
