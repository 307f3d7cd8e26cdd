"""Hugging Face export and import (the work of `nanogpt export` and `nanogpt import`).

Two export formats:
- `remote-code` (default): the card's format, loaded with `trust_remote_code=True`. The folder carries
  `configuration_nanogpt.py` / `modeling_nanogpt.py` (copied from `templates/`, torch + transformers
  only); weights keep nanogpt's own tensor names.
- `gpt2`: a stock `GPT2LMHeadModel`, loadable without remote code. The card's Pre-LN block *is* the
  GPT-2 block, so only names change and Conv1D weights are transposed; what GPT-2 cannot express
  (Post-LN, no biases, an untied head) is refused. `GPT2_FIELDS` is the one map between config names.
  The file names its tensors as the reference GPT-2 checkpoint does (`h.0.attn.c_attn.weight`, `wte.weight`:
  no `transformer.` prefix), which transformers loads and mlx-lm requires.

Both write the GPT-2 tokenizer (built offline from our BPE files), `generation_config.json`, a README
model card with measured numbers, and a marker file so a later export may overwrite the folder.
Tied weights are stored once (the token embedding), as transformers itself saves them.

    export("runs/demo", "exports/demo", "gpt2"); import_hf("exports/demo", "runs/imported")
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanogpt import __version__
from nanogpt.config import ModelConfig, first_difference
from nanogpt.data.chat import JINJA as CHAT_JINJA
from nanogpt.data.tokenizer import EOT_ID, EOT_TOKEN, bpe_files
from nanogpt.errors import UserError, missing_extra
from nanogpt.export.model_card import BenchTable, ParamCounts, read_run_facts, render_model_card
from nanogpt.folders import claim, mark
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import (
    CONFIG,
    TIED_KEY,
    WEIGHTS,
    atomic_dir,
    check_weights,
    load_model,
    load_state_into,
    model_state,
    resolve_checkpoint,
    write_json,
    write_model_files,
)

FORMATS = ("remote-code", "gpt2")
TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE_FILES = ("configuration_nanogpt.py", "modeling_nanogpt.py")
AUTO_MAP = {
    "AutoConfig": "configuration_nanogpt.NanoGPTConfig",
    "AutoModelForCausalLM": "modeling_nanogpt.NanoGPTLMHeadModel",
}

# ModelConfig field -> the GPT2Config field(s) holding the same value. The one map between the names.
GPT2_FIELDS: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size",),
    "context_length": ("n_positions", "n_ctx"),
    "d_model": ("n_embd",),
    "n_layers": ("n_layer",),
    "n_heads": ("n_head",),
    "d_ff": ("n_inner",),
    "dropout": ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
    "ln_eps": ("layer_norm_epsilon",),
    "activation": ("activation_function",),  # value translated by GPT2_ACTIVATIONS
    "tie_embeddings": ("tie_word_embeddings",),
}
# our activation -> GPT-2's name; import also reads GPT-2's other spellings of the tanh GELU
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
GPT2_ACTIVATIONS_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# what every GPT-2 is; a ModelConfig differing here cannot be written as GPT-2
GPT2_FIXED = {"norm_position": "pre", "bias": True, "tie_embeddings": True}
# GPT-2 options with no nanogpt equivalent, and the value nanogpt's network implies
GPT2_IMPLIED = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}
# nanogpt block module -> (GPT-2 module, is a Conv1D whose weight GPT-2 stores transposed)
GPT2_BLOCK_MODULES = {
    "ln1": ("ln_1", False),
    "attn.qkv_proj": ("attn.c_attn", True),
    "attn.out_proj": ("attn.c_proj", True),
    "ln2": ("ln_2", False),
    "ff.fc1": ("mlp.c_fc", True),
    "ff.fc2": ("mlp.c_proj", True),
}
GPT2_TOP = {
    "transformer.token_embedding.weight": "transformer.wte.weight",
    "transformer.position_embedding.weight": "transformer.wpe.weight",
    "transformer.ln_f.weight": "transformer.ln_f.weight",
    "transformer.ln_f.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}


# GPT2LMHeadModel's base model: its state dict's names carry it, the reference checkpoint's file does not
GPT2_BASE = "transformer."


@dataclass(frozen=True)
class ExportResult:
    out: Path
    format: str
    counts: ParamCounts
    files: list[str]
    notes: tuple[str, ...] = ()  # what a tool reading the export should know (printed)


# ---------------------------------------------------------------- GPT-2 names and configs


def gpt2_name(key: str) -> tuple[str, bool]:
    """nanogpt tensor name -> (GPT-2 tensor name, whether GPT-2 stores it transposed)."""
    m = re.fullmatch(r"transformer\.blocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if m:
        module, conv1d = GPT2_BLOCK_MODULES[m[2]]
        return f"transformer.h.{m[1]}.{module}.{m[3]}", conv1d and m[3] == "weight"
    return GPT2_TOP[key], False


def check_gpt2_expressible(cfg: ModelConfig) -> None:
    """Raise a one-line UserError if GPT2LMHeadModel cannot hold this network exactly."""
    for name, value in GPT2_FIXED.items():
        if getattr(cfg, name) != value:
            raise UserError(
                f"a stock GPT-2 needs {name}={value!r} but this model has {getattr(cfg, name)!r}; "
                "export it with --format remote-code"
            )


def gpt2_config(cfg: ModelConfig) -> dict:
    """The config.json of a native GPT2LMHeadModel export."""
    check_gpt2_expressible(cfg)
    d: dict = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    for ours, theirs in GPT2_FIELDS.items():
        value = getattr(cfg, ours)
        for name in theirs:
            d[name] = GPT2_ACTIVATIONS[value] if ours == "activation" else value
    d.update(GPT2_IMPLIED)
    d.update(
        reorder_and_upcast_attn=False,
        initializer_range=0.02,
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
        use_cache=True,
        dtype="float32",
    )
    return d


def config_kinds() -> dict[str, str]:
    """ModelConfig's fields and their types' names ("int", "float", "bool", "str"): what `check_config_values`
    checks a config.json's values against."""
    fields = ModelConfig.__dataclass_fields__.values()
    return {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in fields}


def check_config_values(conf: dict, kinds: dict[str, str], path: Path) -> None:
    """Each present key of `conf` holds a value of its kind ("int": a positive whole number, "float": a
    finite number, "bool", "str"), so that nothing downstream does arithmetic on a string or an inf."""
    fix = "fix that value or download/export the model again"
    for key, kind in kinds.items():
        value = conf.get(key)
        if value is None:
            continue  # absent: the default holds (GPT-2's n_inner may be null)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind == "int" and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise UserError(f"{path}: {key} is {value!r}, not a positive whole number; {fix}")
        if kind == "float" and not (is_number and math.isfinite(value)):
            raise UserError(f"{path}: {key} is {value!r}, not a finite number; {fix}")
        if kind in ("bool", "str") and type(value).__name__ != kind:
            raise UserError(f"{path}: {key} is {value!r}, not a {kind}; {fix}")


def config_from_gpt2(d: dict, path: Path = Path(CONFIG)) -> ModelConfig:
    """A ModelConfig from a GPT-2 config.json, refusing GPT-2 options nanogpt's network does not have."""
    kinds = {"activation_function": "str"}
    for ours, theirs in GPT2_FIELDS.items():
        if ours != "activation":
            kinds |= dict.fromkeys(theirs, config_kinds()[ours])
    check_config_values(d, kinds, path)
    for name, value in GPT2_IMPLIED.items():
        if d.get(name, value) != value:
            raise UserError(f"GPT-2 config has {name}={d[name]!r}, which nanogpt's network does not support")
    act = d.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS_IN:
        raise UserError(
            f"GPT-2 config has activation_function={act!r}; nanogpt supports {', '.join(GPT2_ACTIVATIONS_IN)}"
        )
    kw: dict = {}
    for ours, theirs in GPT2_FIELDS.items():
        if theirs[0] in d:
            kw[ours] = d[theirs[0]]
    kw["activation"] = GPT2_ACTIVATIONS_IN[act]
    if kw.get("d_ff") is None:  # GPT-2's n_inner=None means 4 * n_embd
        kw["d_ff"] = 4 * d.get("n_embd", 768)
    kw.setdefault("tie_embeddings", True)
    return ModelConfig(norm_position="pre", bias=True, **kw)


def to_gpt2_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nanogpt tensors -> GPT2LMHeadModel's state dict (renamed; Linear weights transposed to Conv1D)."""
    out = {}
    for k, v in sd.items():
        name, transpose = gpt2_name(k)
        out[name] = v.t().contiguous() if transpose else v
    return out


def gpt2_checkpoint_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nanogpt tensors -> the tensors of a GPT-2 `model.safetensors`, named as the reference checkpoint
    (openai-community/gpt2) names them: the base model's without `transformer.`. transformers loads either
    naming; mlx-lm's GPT-2 (`sanitize`) takes only this one."""
    return {k.removeprefix(GPT2_BASE): v for k, v in to_gpt2_state(sd).items()}


def from_gpt2_state(sd: dict[str, torch.Tensor], cfg: ModelConfig, source: Path) -> dict[str, torch.Tensor]:
    """GPT-2 tensors (with or without the `transformer.` prefix) -> nanogpt tensors for `cfg`."""
    # the reference checkpoint and our gpt2 exports drop the prefix; older exports and a GPT2LMHeadModel's
    # own save_pretrained keep it
    sd = {(k if k.startswith((GPT2_BASE, "lm_head.")) else GPT2_BASE + k): v for k, v in sd.items()}
    with torch.device("meta"):
        keys = list(NanoGPTLMHeadModel(cfg).state_dict())
    out = {}
    for k in keys:
        name, transpose = gpt2_name(k)
        if name not in sd:
            if k == "lm_head.weight" and cfg.tie_embeddings:
                continue
            raise UserError(f"{source} is missing the tensor {name!r}; the GPT-2 checkpoint is incomplete")
        out[k] = sd[name].t().contiguous() if transpose else sd[name]
    return out


# ---------------------------------------------------------------- the files of an export


def remote_code_config(cfg: ModelConfig) -> dict[str, Any]:
    d: dict[str, Any] = {
        "architectures": ["NanoGPTLMHeadModel"],
        "model_type": "nanogpt",
        "auto_map": AUTO_MAP,
    }
    d.update(cfg.to_dict())
    d.update(
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
        use_cache=True,
        dtype="float32",
    )
    return d


def write_tokenizer(folder: Path, context_length: int) -> None:
    """GPT-2's byte-level BPE as tokenizer.json (+ vocab.json, merges.txt, configs), built offline."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    except ImportError:
        raise missing_extra("export needs the `tokenizers` package", "hf") from None
    encoder, merges = bpe_files()
    tok = Tokenizer(models.BPE.from_file(str(encoder), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOT_TOKEN, special=True)])
    tok.save(str(folder / "tokenizer.json"))
    shutil.copyfile(encoder, folder / "vocab.json")
    shutil.copyfile(merges, folder / "merges.txt")
    # GPT-2 has no padding token; batching (padding=True, data collators, batched generate) needs one, and
    # padded positions are masked out, so the end-of-text token serves, as is usual for GPT-2
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN, "pad_token": EOT_TOKEN}
    write_json(folder / "special_tokens_map.json", special)
    write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "GPT2Tokenizer",
            **special,
            "add_prefix_space": False,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "model_max_length": context_length,
            # "<|endoftext|>" typed in text is text, as in training (nanogpt.data.tokenizer): without this,
            # transformers would turn it into the separator token that only ever ends a document
            "split_special_tokens": True,
            # the one chat template fine-tuning trains on (nanogpt.data.chat), for apply_chat_template
            "chat_template": CHAT_JINJA,
            "added_tokens_decoder": {
                str(EOT_ID): {
                    "content": EOT_TOKEN,
                    "lstrip": False,
                    "normalized": True,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
            },
        },
    )


def generation_config() -> dict:
    return {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID}


def check_bench(bench: BenchTable, cfg: ModelConfig) -> None:
    """A bench table goes into this model's card only if it measured this model's configuration."""
    ours = cfg.to_dict()
    key = first_difference(ours, bench.config)
    if key is not None:
        raise UserError(
            f"the bench at {bench.source} measured another configuration ({key} {bench.config.get(key)!r}, "
            f"this model's {ours.get(key)!r}); run `nanogpt bench --model` on this checkpoint and pass its --out"
        )


def export(
    model_path: str | Path,
    out: str | Path,
    fmt: str = "remote-code",
    force: bool = False,
    bench: BenchTable | None = None,
    repo: str | None = None,
    held_out: dict[str, Any] | None = None,
) -> ExportResult:
    """Write checkpoint `model_path` (run or checkpoint folder) as a Hugging Face folder `out`.

    `bench`: a `nanogpt bench` table of this configuration (the command reads it), for the model card.
    `held_out`: a `nanogpt eval --json` result of this checkpoint, for the model card.
    `repo`: the Hub repo id the folder is made for (`--push-to-hub`): the card's snippet loads from it, not
    from the local `out`, so the published snippet works for everyone.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    out = Path(out)
    folder = resolve_checkpoint(model_path)
    cfg = ModelConfig.load(folder / CONFIG)
    if fmt == "gpt2":
        check_gpt2_expressible(cfg)
    claim(out, "export", force=force)
    model = load_model(folder)  # names a missing or mis-shaped tensor
    counts = ParamCounts(model.num_params(unique=False), model.num_params(unique=True))
    sd = model_state(model)  # the tied head is dropped: stored once, as transformers does
    facts = replace(read_run_facts(folder), held_out=held_out)
    if bench is not None:
        check_bench(bench, cfg)
    with atomic_dir(out) as tmp:
        if fmt == "remote-code":
            write_json(tmp / CONFIG, remote_code_config(cfg))
            save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
            for name in TEMPLATE_FILES:
                shutil.copyfile(TEMPLATES / name, tmp / name)
        else:
            write_json(tmp / CONFIG, gpt2_config(cfg))
            save_file(gpt2_checkpoint_state(sd), str(tmp / WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / "generation_config.json", generation_config())
        write_tokenizer(tmp, cfg.context_length)
        (tmp / "README.md").write_text(
            render_model_card(cfg, facts, counts, fmt, repo or str(out), bench.markdown if bench else None)
        )
        mark(tmp, "export", format=fmt, source=str(folder))
        files = sorted(p.name for p in tmp.iterdir())
    return ExportResult(out=out, format=fmt, counts=counts, files=files, notes=export_notes(cfg, fmt))


def export_notes(cfg: ModelConfig, fmt: str) -> tuple[str, ...]:
    """What a tool other than transformers cannot read in this export (docs/export.md has the list)."""
    if fmt == "gpt2" and cfg.d_ff != 4 * cfg.d_model:  # transformers reads n_inner; mlx-lm assumes 4x
        return (
            f"mlx-lm cannot load this gpt2 export: its GPT-2 assumes d_ff = 4 x d_model ({4 * cfg.d_model}), "
            f"this model has d_ff {cfg.d_ff} (transformers loads it)",
        )
    return ()


# ---------------------------------------------------------------- import


def load_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, else pytorch_model.bin (tensors only: weights_only=True, never a pickle)."""
    st, pt = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.is_file():
        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{st} is corrupt or truncated ({e}); download or export it again") from None
    if pt.is_file():
        try:
            # torch warns (several lines) about a pickle protocol it did not write before refusing the file:
            # the one-line refusal below says all the user needs
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sd = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler raises many types for a bad or unsafe file
            raise UserError(
                f"{pt} cannot be read as plain tensors ({type(e).__name__}); use a safetensors copy"
            ) from None
        # weights_only still admits lists, numbers and strings: a state dict is names -> tensors
        bad = next((k for k, v in sd.items() if not torch.is_tensor(v)), None) if isinstance(sd, dict) else sd
        if not isinstance(sd, dict) or bad is not None:
            what = f"{bad!r} is not a tensor" if isinstance(sd, dict) else f"it holds a {type(sd).__name__}"
            raise UserError(
                f"{pt} is not a state dict of tensors ({what}); download or export the model again"
            )
        return sd
    if (folder / "model.safetensors.index.json").is_file():
        raise UserError(f"{folder} holds a sharded checkpoint; merge it into one model.safetensors first")
    raise UserError(
        f"{folder} has no model.safetensors or pytorch_model.bin; pass a Hugging Face model folder"
    )


def check_layer_count(cfg: ModelConfig, sd: dict[str, torch.Tensor], conf_path: Path) -> None:
    """config.json's layer count against the weights' before any model is built: even on the meta device,
    building 100,000 layers that a bad config asks for takes minutes (the other sizes cost nothing there)."""
    found = {int(m[1]) for k in sd if (m := re.match(r"(?:transformer\.)?(?:h|blocks)\.(\d+)\.", k))}
    n = max(found) + 1 if found else 0
    if n != cfg.n_layers:
        raise UserError(
            f"{conf_path} says {cfg.n_layers} layers but the weights next to it hold {n}; the folder is "
            "mismatched: download or export it again"
        )


def import_hf(hf_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """A GPT-2 or nanogpt (remote-code) Hugging Face folder -> a nanogpt checkpoint folder `out`.

    `out` must be absent, empty or an earlier import (see nanogpt.folders.claim); `force` replaces anything.
    """
    src = Path(hf_dir)
    claim(out, "checkpoint", force=force)
    conf_path = src / CONFIG
    if not conf_path.is_file():
        raise UserError(f"{conf_path} not found; pass a Hugging Face model folder to --hf")
    try:
        conf = json.loads(conf_path.read_text(encoding="utf-8"))
    except ValueError:  # not JSON, or not UTF-8
        raise UserError(f"{conf_path} is not valid JSON; download or export it again") from None
    if not isinstance(conf, dict):
        raise UserError(
            f"{conf_path} holds a JSON {type(conf).__name__}, not an object of settings; "
            "download or export it again"
        )
    kind = conf.get("model_type")
    if kind == "gpt2":
        cfg = config_from_gpt2(conf, conf_path)
        sd = load_hf_weights(src)
        check_layer_count(cfg, sd, conf_path)
        sd = from_gpt2_state(sd, cfg, src)
    elif kind == "nanogpt":
        kinds = config_kinds()
        check_config_values(conf, kinds, conf_path)
        cfg = ModelConfig.from_dict({k: v for k, v in conf.items() if k in kinds})
        sd = load_hf_weights(src)
        check_layer_count(cfg, sd, conf_path)
    elif kind is None:
        raise UserError(
            f"{conf_path} has no model_type; nanogpt imports GPT-2 (model_type 'gpt2') or its own exports "
            "('nanogpt'): pass such a folder, or add the right model_type"
        )
    else:
        raise UserError(
            f"{src} holds a {kind!r} model; nanogpt imports GPT-2 (model_type 'gpt2') or its own exports only"
        )
    with torch.device("meta"):  # shapes first: a config that does not fit the file allocates nothing
        expected = {k: tuple(v.shape) for k, v in NanoGPTLMHeadModel(cfg).state_dict().items()}
    tied = {TIED_KEY} if cfg.tie_embeddings else set()
    found = {k: tuple(v.shape) for k, v in sd.items() if k not in tied}
    check_weights({k: v for k, v in expected.items() if k not in tied}, found, src)
    model = NanoGPTLMHeadModel(cfg)
    load_state_into(model, sd, src / WEIGHTS)
    with atomic_dir(out) as tmp:
        write_model_files(tmp, model)
        mark(tmp, "checkpoint", source=str(src))
    return Path(out)


# ---------------------------------------------------------------- hub


def hub_token() -> str:
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise UserError(
            "--push-to-hub needs a Hugging Face write token in the HF_TOKEN environment variable; "
            "create one at https://huggingface.co/settings/tokens"
        )
    return token


def push_to_hub(folder: Path, repo: str, token: str) -> str:
    """Upload an export folder to the Hub repo `repo` (created if missing); returns the repo URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise missing_extra("--push-to-hub needs huggingface_hub", "hf") from None
    api = HfApi(token=token)
    url = api.create_repo(repo, exist_ok=True)
    api.upload_folder(
        repo_id=repo, folder_path=str(folder), commit_message=f"Upload nanogpt {__version__} export"
    )
    return str(url)
