"""GGUF export read back with gguf's own reader (llama.cpp's Python library): metadata, tokenizer, tensor names,
shapes, types and values (f32 exact), the file/folder rules and the refusals. No llama.cpp here: the runtime
checks are in test_gguf_llama_cpp.py (marked ecosystem)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from nanogpt import cli  # noqa: E402
from nanogpt.data.tokenizer import EOT_ID, EOT_TOKEN, bpe_files  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.export.gguf import (  # noqa: E402
    GGUF_FILE,
    MODELFILE,
    VERSION_KEY,
    export_gguf,
    gguf_name,
    header_fields,
)
from nanogpt.folders import MARKER  # noqa: E402
from nanogpt.model.gpt import NanoGPTLMHeadModel  # noqa: E402
from nanogpt.train.checkpoint import save_model  # noqa: E402
from tests.bad_input import refuse  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402

# d_ff 96 is not 4 * d_model (256): llama.cpp's own converter would write the wrong feed_forward_length
CFG = {"d_model": 64, "n_heads": 4, "d_ff": 96, "context_length": 48, "ln_eps": 1e-6}


def make_ckpt(path, seed=0, **changes) -> NanoGPTLMHeadModel:
    """A tiny checkpoint whose biases and norms are random too, so a swapped or zeroed tensor shows."""
    torch.manual_seed(seed)
    model = NanoGPTLMHeadModel(tiny_config(**{**CFG, **changes})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "ln" in name and name.endswith("weight") else 0.0, 0.1)
    save_model(path, model)
    return model


def field(reader, key):
    """A GGUF metadata value as Python: a scalar, a string, or a list (works on every gguf nanogpt allows)."""
    f = reader.get_field(key)
    assert f is not None, f"{key} missing"
    kind = f.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i][0].item() for i in f.data]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]][0].item()


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The tied model and its three exports, read back: (model, {outtype: GGUFReader})."""
    root = tmp_path_factory.mktemp("gguf")
    model = make_ckpt(root / "run" / "best")
    files = {t: export_gguf(root / "run", root / f"m_{t}.gguf", t).out for t in ("f32", "f16", "q8_0")}
    return model, {t: gguf.GGUFReader(f) for t, f in files.items()}


def test_metadata_and_tokenizer(tied):
    model, readers = tied
    r = readers["f32"]
    cfg = model.config
    assert field(r, "general.architecture") == "gpt2"
    assert field(r, "general.name") == "run"  # the run folder, not its best/
    assert field(r, "general.file_type") == 0
    assert field(r, VERSION_KEY)
    expected = {
        "gpt2.context_length": 48,
        "gpt2.embedding_length": 64,
        "gpt2.block_count": 2,
        "gpt2.attention.head_count": 4,
        "gpt2.feed_forward_length": 96,
    }
    assert {k: field(r, k) for k in expected} == expected
    assert field(r, "gpt2.attention.layer_norm_epsilon") == pytest.approx(cfg.ln_eps, rel=1e-6)
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(r, "tokenizer.ggml.tokens")
    encoder, merges_path = bpe_files()
    assert tokens == sorted(json.loads(encoder.read_text()), key=json.loads(encoder.read_text()).get)
    assert len(tokens) == 50257 and tokens[EOT_ID] == EOT_TOKEN and tokens[15496] == "Hello"
    types = field(r, "tokenizer.ggml.token_type")
    assert types[EOT_ID] == gguf.TokenType.CONTROL and set(types[:EOT_ID]) == {gguf.TokenType.NORMAL}
    merges = field(r, "tokenizer.ggml.merges")
    assert len(merges) == 50000 and merges[0] == "Ġ t"
    assert merges == merges_path.read_text(encoding="utf-8").splitlines()[1:50001]
    assert field(r, "tokenizer.ggml.bos_token_id") == field(r, "tokenizer.ggml.eos_token_id") == EOT_ID
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert field(readers["f16"], "general.file_type") == 1
    assert field(readers["q8_0"], "general.file_type") == 7
    # the quick header read that recognises our own files agrees with gguf's reader
    assert header_fields(Path(r.data.filename)) == {
        "general.architecture": "gpt2",
        VERSION_KEY: field(r, VERSION_KEY),
        "general.file_type": 0,
        "general.name": "run",
    }


def test_f32_tensors_are_ours_exactly(tied):
    model, readers = tied
    found = {t.name: t for t in readers["f32"].tensors}
    sd = {
        k: v for k, v in model.state_dict().items() if k != "lm_head.weight"
    }  # tied: llama.cpp reuses token_embd
    assert set(found) == {gguf_name(k) for k in sd}
    assert "output.weight" not in found and len(found) == 4 + 12 * 2
    # every name is one llama.cpp's gpt2 architecture knows
    arch = gguf.MODEL_ARCH.GPT2
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    for name in found:
        base = name.rsplit(".", 1)[0]
        assert any(base == k.format(bid=i) for k in known for i in range(2)), name
    for key, value in sd.items():
        t = found[gguf_name(key)]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == list(reversed(value.shape))  # GGML lists dimensions innermost first
        np.testing.assert_array_equal(np.asarray(t.data).reshape(value.shape), value.numpy())
    qkv = found["blk.1.attn_qkv.weight"]
    assert list(qkv.shape) == [64, 3 * 64]  # {n_embd, n_embd + 2 * n_embd_gqa}: what the gpt2 loader asks
    assert list(found["blk.0.ffn_down.weight"].shape) == [96, 64]  # {n_ff, n_embd}
    assert list(found["position_embd.weight"].shape) == [64, 48]  # {n_embd, n_ctx_train}


def test_f16_and_q8_0_types_and_values(tied):
    model, readers = tied
    sd = model.state_dict()
    f16 = {t.name: t for t in readers["f16"].tensors}
    q8 = {t.name: t for t in readers["q8_0"].tensors}
    T = gguf.GGMLQuantizationType
    for key, value in sd.items():
        if key == "lm_head.weight":
            continue
        name, x = gguf_name(key), value.numpy()
        matrix = (
            x.ndim == 2 and name != "position_embd.weight"
        )  # the position table stays f32 (as llama.cpp's)
        a, b = f16[name], q8[name]
        assert a.tensor_type == (T.F16 if matrix else T.F32), name
        assert b.tensor_type == (T.Q8_0 if matrix else T.F32), name
        np.testing.assert_array_equal(
            np.asarray(a.data).reshape(x.shape), x.astype(np.float16 if matrix else np.float32)
        )
        if not matrix:
            np.testing.assert_array_equal(np.asarray(b.data).reshape(x.shape), x)
            continue
        deq = gguf.quants.dequantize(np.asarray(b.data), T.Q8_0).reshape(x.shape)
        # q8_0: per block of 32 values, step = max|x| / 127 stored in f16: half a step, plus 127 times the
        # f16 rounding of the step
        step = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        assert (np.abs(deq - x).reshape(-1, 32) <= step * (0.5 + 127 * 2**-11)).all(), name
        assert not np.array_equal(deq, x)


def test_untied_bias_free_and_odd_rows(tmp_path):
    """No biases: zeros where llama.cpp's gpt2 loader needs them. An untied head: output.weight. q8_0 rows
    that are not whole 32-value blocks (d_ff 80 in ffn_down) stay f16, as llama.cpp's converter does."""
    model = make_ckpt(tmp_path / "ckpt", bias=False, tie_embeddings=False, d_ff=80)
    found = {
        t.name: t
        for t in gguf.GGUFReader(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32").out).tensors
    }
    head = model.lm_head.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(found["output.weight"].data).reshape(head.shape), head)
    assert not np.array_equal(head, model.transformer.token_embedding.weight.detach().numpy())
    for name in ("blk.0.attn_qkv.bias", "blk.1.ffn_down.bias", "blk.1.ffn_norm.bias", "output_norm.bias"):
        assert found[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert not np.asarray(found[name].data).any(), name
    assert found["blk.0.ffn_up.bias"].shape.tolist() == [80]
    res = export_gguf(tmp_path / "ckpt", tmp_path / "q.gguf", "q8_0")
    assert res.tensor_types["blk.0.ffn_down.weight"] == "f16"  # rows of 80 values
    assert res.tensor_types["blk.0.ffn_up.weight"] == res.tensor_types["output.weight"] == "q8_0"


def test_folder_export_has_modelfile_and_marker(tmp_path, capsys):
    make_ckpt(tmp_path / "ckpt")
    out = tmp_path / "exp"
    assert cli.main(["export", "--model", str(tmp_path / "ckpt"), "--out", str(out), "--format", "gguf"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / GGUF_FILE} (gguf, f16)" in printed and "Modelfile" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted([GGUF_FILE, MODELFILE, MARKER])
    mf = (out / MODELFILE).read_text()
    assert mf.splitlines()[0] == f"FROM ./{GGUF_FILE}"
    assert 'PARAMETER stop "<|endoftext|>"' in mf and "PARAMETER num_ctx 48" in mf
    assert json.loads((out / MARKER).read_text())["format"] == "gguf"
    assert header_fields(out / GGUF_FILE)["general.file_type"] == 1  # f16, the default
    # a second export replaces the folder nanogpt wrote, now as q8_0
    assert (
        cli.main(
            [
                "export",
                "--model",
                str(tmp_path / "ckpt"),
                "--out",
                str(out),
                "--format",
                "gguf",
                "--outtype",
                "q8_0",
            ]
        )
        == 0
    )
    assert header_fields(out / GGUF_FILE)["general.file_type"] == 7


def test_file_export_replaces_only_its_own(tmp_path, capsys):
    make_ckpt(tmp_path / "ckpt")
    out = tmp_path / "sub" / "m.gguf"
    argv = [
        "export",
        "--model",
        str(tmp_path / "ckpt"),
        "--out",
        str(out),
        "--format",
        "gguf",
        "--outtype",
        "f32",
    ]
    assert cli.main(argv) == 0
    first = out.read_bytes()
    assert cli.main(argv) == 0  # an earlier nanogpt GGUF: replaced without --force
    assert out.read_bytes() == first  # and the export is deterministic
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]  # no temporary file left behind
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"GGUF not nanogpt's")
    refuse(
        capsys,
        [*argv[:4], str(mine), *argv[5:]],
        names=[str(mine), "did not write"],
        fix="--force",
        untouched=[mine],
    )
    assert cli.main([*argv[:4], str(mine), *argv[5:], "--force"]) == 0
    assert mine.read_bytes() == first


@pytest.mark.parametrize(
    "changes, flags, names, fix",
    [
        ({"norm_position": "post"}, [], "norm_position='post'", "--format remote-code"),
        ({"vocab_size": 1000}, [], "vocab_size=1000", "--format remote-code"),
        ({}, ["--outtype", "q4_0"], "q4_0", "--help"),
        ({}, ["--bench", "b"], "--bench", "drop it"),
        ({}, ["--push-to-hub", "me/x"], "--push-to-hub", "drop it"),
    ],
)  # fmt: skip
def test_refusals(capsys, tmp_path, changes, flags, names, fix):
    make_ckpt(tmp_path / "ckpt", **changes)
    out = tmp_path / "m.gguf"
    argv = ["export", "--model", str(tmp_path / "ckpt"), "--out", str(out), "--format", "gguf", *flags]
    refuse(capsys, argv, names=names, fix=fix, untouched=[tmp_path / "ckpt", out])
    assert not out.exists()


def test_outtype_needs_gguf(capsys, tmp_path):
    make_ckpt(tmp_path / "ckpt")
    argv = ["export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--outtype", "f16"]
    refuse(capsys, argv, names="--outtype", fix="--format gguf", untouched=[tmp_path / "hf"])


def test_unknown_outtype_in_the_api(tmp_path):
    with pytest.raises(UserError, match="q4_0"):
        export_gguf(tmp_path, tmp_path / "m.gguf", "q4_0")
