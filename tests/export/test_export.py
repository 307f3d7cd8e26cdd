"""Hugging Face export/import against real transformers, offline: parity, generation, round trips, errors."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing below may touch the network

import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402

from nanogpt import cli  # noqa: E402
from nanogpt.commands.export import main as export_main  # noqa: E402
from nanogpt.commands.import_ import main as import_main  # noqa: E402
from nanogpt.config import ModelConfig, preset  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.export import hf  # noqa: E402
from nanogpt.folders import MARKER  # noqa: E402
from nanogpt.model.gpt import NanoGPTLMHeadModel  # noqa: E402
from nanogpt.train.checkpoint import save_model  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of France is a city that"]


def tiny(**changes) -> ModelConfig:
    """The tiny model with a 128-token context: room for the card's prompts and their continuations."""
    return tiny_config(**{"context_length": 128, **changes})


def make_ckpt(path: Path, cfg: ModelConfig, seed: int = 0) -> NanoGPTLMHeadModel:
    torch.manual_seed(seed)
    model = NanoGPTLMHeadModel(cfg).eval()
    save_model(path, model)
    return model


def tokenize(text: str) -> list[int]:
    from nanogpt.data.tokenizer import get_tokenizer

    return get_tokenizer().encode(text)


def load_hf(folder: Path):
    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()


def greedy_ours(model: NanoGPTLMHeadModel, ids: list[int], n: int) -> list[int]:
    try:
        from nanogpt.infer.generate import generate
        from nanogpt.infer.sampling import SamplingParams
    except ImportError:  # generate.py not there yet: a plain greedy loop without a cache
        out = list(ids)
        with torch.no_grad():
            for _ in range(n):
                out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
        return out[len(ids) :]
    return list(generate(model, ids, SamplingParams(max_tokens=n, temperature=0.0), stop_at_eot=False))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny checkpoint exported in both formats: {"model": ours, "remote-code": dir, "gpt2": dir}."""
    root = tmp_path_factory.mktemp("export")
    model = make_ckpt(root / "ckpt", tiny())
    out = {"model": model, "ckpt": root / "ckpt"}
    for fmt in hf.FORMATS:
        out[fmt] = hf.export(root / "ckpt", root / fmt, fmt).out
    return out


def test_card_snippet_runs_unchanged(exported):
    """The card's "Basic Text Generation" code, with only the repo id replaced, in a fresh process."""
    repo = str(exported["remote-code"])
    code = f'''
from transformers import AutoTokenizer, AutoModelForCausalLM

# Load model and tokenizer (requires trust_remote_code for custom architecture)
tokenizer = AutoTokenizer.from_pretrained("{repo}")
model = AutoModelForCausalLM.from_pretrained(
    "{repo}",
    trust_remote_code=True
)

# Generate text
prompt = "Once upon a time"
inputs = tokenizer(prompt, return_tensors="pt")
outputs = model.generate(
    **inputs,
    max_length=100,
    temperature=0.8,
    top_k=50,
    do_sample=True,
    pad_token_id=tokenizer.eos_token_id
)

text = tokenizer.decode(outputs[0], skip_special_tokens=True)
print(text)
'''
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    # transformers 5 asks on stdout whether to run custom code for AutoTokenizer (stdin closed: it goes on)
    text = r.stdout.split("[y/N] ")[-1]
    assert text.startswith("Once upon a time")
    assert len(tokenize(text)) > 60  # ~84 generated tokens after the 4-token prompt


@pytest.mark.parametrize("fmt", hf.FORMATS)
def test_auto_classes_load_both_formats(exported, fmt):
    folder = exported[fmt]
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.eos_token_id == 50256
    model = load_hf(folder)
    expected = "NanoGPTLMHeadModel" if fmt == "remote-code" else "GPT2LMHeadModel"
    assert type(model).__name__ == expected
    if fmt == "gpt2":  # a stock class: no remote code needed at all
        plain = AutoModelForCausalLM.from_pretrained(str(folder))
        assert type(plain) is GPT2LMHeadModel
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.data_ptr() == head.data_ptr()  # the tied head is really tied after loading
    for name in ("README.md", "generation_config.json", "tokenizer.json", MARKER):
        assert (folder / name).is_file()


def test_remote_code_folder_contents(exported):
    folder, model = exported["remote-code"], exported["model"]
    conf = json.loads((folder / "config.json").read_text())
    assert conf["model_type"] == "nanogpt"
    assert conf["architectures"] == ["NanoGPTLMHeadModel"]
    assert conf["auto_map"] == hf.AUTO_MAP
    assert {k: conf[k] for k in model.config.to_dict()} == model.config.to_dict()
    tensors = load_file(str(folder / "model.safetensors"))
    assert "lm_head.weight" not in tensors  # tied weights stored once
    assert torch.equal(
        tensors["transformer.token_embedding.weight"], model.transformer.token_embedding.weight
    )
    for name in hf.TEMPLATE_FILES:  # self-contained: torch and transformers only
        tree = ast.parse((folder / name).read_text())
        roots = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots.add(node.module.split(".")[0])
        assert roots <= {"math", "torch", "transformers"}, roots
    assert str(load_hf(folder)) == str(model)  # the card's module tree, reprs included


@pytest.mark.parametrize(
    ("fmt", "changes"),
    [
        ("remote-code", {}),
        ("remote-code", {"norm_position": "post", "activation": "gelu_tanh"}),
        ("remote-code", {"bias": False, "tie_embeddings": False}),
        ("gpt2", {}),
        ("gpt2", {"activation": "gelu_tanh", "ln_eps": 1e-6}),
    ],
)
def test_logit_and_greedy_parity_tiny(tmp_path, fmt, changes):
    model = make_ckpt(tmp_path / "ckpt", tiny(**changes), seed=1)
    hf_model = load_hf(hf.export(tmp_path / "ckpt", tmp_path / "out", fmt).out)
    x = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf_model(x).logits - model(x)).abs().max().item()
    print(f"max |logit diff| {fmt} {changes}: {diff:.3g}")
    assert diff < 1e-5
    ids = AutoTokenizer.from_pretrained(str(tmp_path / "out"), trust_remote_code=True)(PROMPTS[0])[
        "input_ids"
    ]
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=50256)
    assert out[0, len(ids) :].tolist() == greedy_ours(model, ids, 12)


@pytest.fixture(scope="module")
def card_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    model = make_ckpt(root / "ckpt", preset("card"))
    return model, root


@pytest.mark.parametrize("fmt", hf.FORMATS)
def test_logit_and_greedy_parity_card(card_export, fmt):
    model, root = card_export
    hf_model = load_hf(hf.export(root / "ckpt", root / fmt, fmt).out)
    if fmt == "remote-code":
        assert str(hf_model) == str(model)
    x = torch.randint(0, 50257, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf_model(x).logits - model(x)).abs().max().item()
    print(f"max |logit diff| {fmt} card: {diff:.3g}")
    assert diff < 1e-5
    ids = x[0, :8].tolist()
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=50256)
    assert out[0, 8:].tolist() == greedy_ours(model, ids, 6)


@pytest.mark.parametrize("fmt", hf.FORMATS)
def test_left_padded_batch_matches_single_prompts(exported, fmt):
    folder = exported[fmt]
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"  # the export's own, as its model card says
    tok.padding_side = "left"
    model = load_hf(folder)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # the short prompt really is padded
    outs = model.generate(**batch, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    width = batch["input_ids"].shape[1]
    for row, prompt in zip(outs, PROMPTS, strict=True):
        single = tok(prompt, return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
        assert row[width:].tolist() == alone[0, single["input_ids"].shape[1] :].tolist()


def test_generate_uses_the_kv_cache(exported):
    """After the prompt, every forward pass sees one new token: the cache carries the rest."""
    model = load_hf(exported["remote-code"])
    lengths = []
    handle = model.transformer.token_embedding.register_forward_hook(
        lambda m, i, o: lengths.append(i[0].shape[1])
    )
    model.generate(torch.tensor([[464, 3139, 286]]), max_new_tokens=5, do_sample=False, pad_token_id=50256)
    handle.remove()
    assert lengths == [3, 1, 1, 1, 1]


def test_hidden_states_labels_and_cache_object(exported):
    model, ours = load_hf(exported["remote-code"]), exported["model"]
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(x, labels=x, output_hidden_states=True, use_cache=True)
        logits = ours(x)
    assert len(out.hidden_states) == ours.config.n_layers + 1
    assert out.hidden_states[0].shape == (2, 16, ours.config.d_model)
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), logits, atol=1e-5, rtol=0)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50257), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    assert isinstance(cache, transformers.DynamicCache) and cache.get_seq_length() == 16
    with torch.no_grad():  # feeding one more token through the returned cache equals the full recomputation
        step = model(x[:, :1], **{"cache" if "cache" in out else "past_key_values": cache}).logits
        full = ours(torch.cat([x, x[:, :1]], 1))[:, -1:]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", hf.FORMATS)
def test_round_trip_is_bit_identical(exported, tmp_path, fmt):
    import_main(["--hf", str(exported[fmt]), "--out", str(tmp_path / "imported")])
    original = load_file(str(exported["ckpt"] / "model.safetensors"))
    imported = load_file(str(tmp_path / "imported" / "model.safetensors"))
    assert original.keys() == imported.keys()
    assert all(torch.equal(original[k], imported[k]) for k in original)
    again = hf.export(tmp_path / "imported", tmp_path / "again", fmt).out
    assert (again / "model.safetensors").read_bytes() == (exported[fmt] / "model.safetensors").read_bytes()
    assert (again / "config.json").read_text() == (exported[fmt] / "config.json").read_text()


def test_gpt2_export_names_tensors_as_the_reference_checkpoint(exported):
    """The reference GPT-2 file's names, without `transformer.` (mlx-lm takes no other), and transformers
    loads them with nothing missing, unexpected or mis-shaped."""
    tensors = load_file(str(exported["gpt2"] / "model.safetensors"))
    block = [f"{m}.{p}" for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
             for p in ("weight", "bias")]  # fmt: skip
    top = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"]  # the head is tied: stored once
    assert sorted(tensors) == sorted(top + [f"h.{i}.{n}" for i in range(2) for n in block])
    assert tensors["h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)
    model, info = GPT2LMHeadModel.from_pretrained(str(exported["gpt2"]), output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert torch.equal(model.transformer.wte.weight, exported["model"].transformer.token_embedding.weight)


def test_import_reads_both_gpt2_namings(exported, tmp_path):
    """Exports written before the names changed carry the `transformer.` prefix: they import the same."""
    from safetensors.torch import save_file

    old = tmp_path / "old"
    shutil.copytree(exported["gpt2"], old)
    original = load_file(str(exported["ckpt"] / "model.safetensors"))
    save_file(hf.to_gpt2_state(original), str(old / "model.safetensors"))  # GPT2LMHeadModel's own names
    assert "transformer.h.0.attn.c_attn.weight" in load_file(str(old / "model.safetensors"))
    for folder in (exported["gpt2"], old):
        hf.import_hf(folder, tmp_path / f"from_{folder.name}")
        imported = load_file(str(tmp_path / f"from_{folder.name}" / "model.safetensors"))
        assert imported.keys() == original.keys()
        assert all(torch.equal(original[k], imported[k]) for k in original), folder


def test_gpt2_export_says_when_mlx_lm_cannot_load_it(tmp_path, capsys):
    """mlx-lm's GPT-2 assumes d_ff = 4 x d_model (transformers reads n_inner): the export says so."""

    def notes_of(cfg: ModelConfig, name: str) -> list[str]:
        make_ckpt(tmp_path / name, cfg)
        argv = ["--model", str(tmp_path / name), "--out", str(tmp_path / f"{name}_gpt2"), "--format", "gpt2"]
        assert export_main(argv) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]

    assert notes_of(tiny(d_ff=96), "narrow") == [
        "note: mlx-lm cannot load this gpt2 export: its GPT-2 assumes d_ff = 4 x d_model (128), this model "
        "has d_ff 96 (transformers loads it)"
    ]
    assert notes_of(tiny(), "four_x") == []


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_import_stock_transformers_gpt2(tmp_path, weights):
    """A GPT-2 written by transformers itself (tanh GELU, untied-free) imports with equal logits."""
    conf = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=50257, activation_function="gelu_new"
    )
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(conf).eval()
    if weights == "safetensors":
        ref.save_pretrained(tmp_path / "gpt2")
    else:
        (tmp_path / "gpt2").mkdir()
        conf.save_pretrained(tmp_path / "gpt2")
        torch.save(ref.state_dict(), tmp_path / "gpt2" / "pytorch_model.bin")
    hf.import_hf(tmp_path / "gpt2", tmp_path / "ours")
    from nanogpt.train.checkpoint import load_model

    ours = load_model(tmp_path / "ours")
    assert ours.config.activation == "gelu_tanh" and ours.config.d_ff == 128
    x = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, atol=1e-5, rtol=0)


def test_model_card_readme(tmp_path, small_data):
    run = tmp_path / "run"
    make_ckpt(run / "last", tiny())
    make_ckpt(run / "best", tiny())
    rows = [{"step": 0, "val_loss": 10.9, "val_ppl": 54176.0}, {"step": 10, "loss": 9.0}]
    rows += [
        {"step": 20, "val_loss": 7.25, "val_ppl": 1408.1},
        {"step": 30, "val_loss": 7.5, "val_ppl": 1808.0},
    ]
    (run / "log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3'
    )  # torn last line
    state = {"step": 30, "tokens": 46080, "data_dir": str(small_data)}  # as train.py writes it
    (run / "last" / "state.json").write_text(json.dumps(state))
    text = (hf.export(run, tmp_path / "out", "gpt2").out / "README.md").read_text()
    model = NanoGPTLMHeadModel(tiny())
    assert text.startswith("---\nlanguage:\n- en\n")
    assert "pipeline_tag: text-generation" in text and 'example_title: "Story Beginning"' in text
    assert f"{model.num_params(unique=False):,}" in text and f"{model.num_params(unique=True):,}" in text
    assert "33,691,776" in text and "Pre-LN" in text
    assert "7.2500" in text and "1408.10" in text and "step 20" in text  # best/ is the lowest val loss
    assert "46,080" in text and "Iterations:** 30" in text and "training tokens" in text
    assert str(tmp_path / "out") in text
    # a bare checkpoint: no training facts, and none invented
    make_ckpt(tmp_path / "bare", tiny())
    bare = (hf.export(tmp_path / "bare", tmp_path / "out2").out / "README.md").read_text()
    assert "### Training" not in bare and "validation" not in bare
    assert "trust_remote_code=True" in bare
    # PEFT has no default target modules for a remote-code model: its card names them; GPT-2's needs none
    targets = 'target_modules=["qkv_proj", "out_proj", "fc1", "fc2"]'
    assert targets in bare and targets not in text and "PEFT's default target modules" in text
    assert all('tokenizer.padding_side = "left"' in t and "`pad_token`" in t for t in (bare, text))
    assert 'attn_implementation="eager"' in bare and "GPT2TokenizerFast.from_pretrained" in bare


def test_model_card_takes_the_bench_table(exported, tmp_path, capsys):
    from nanogpt.bench.run import fmt, markdown_table, run_bench, write_outputs
    from nanogpt.commands.export import read_bench_table

    res = run_bench(NanoGPTLMHeadModel(tiny()), batch=1, seq=16, repeats=1, warmup=0)  # bench trains it
    write_outputs(res, tmp_path / "bench")
    rc = cli.main(
        [
            "export",
            "--model",
            str(exported["ckpt"]),
            "--out",
            str(tmp_path / "o"),
            "--bench",
            str(tmp_path / "bench"),
        ]
    )
    assert rc == 0
    text = (tmp_path / "o" / "README.md").read_text()
    assert "### Performance Benchmarks" in text
    assert text.index("### Performance Benchmarks") < text.index("## Usage")
    train = res.row("train_tokens_per_s")
    line = next(ln for ln in markdown_table(res).splitlines() if ln.startswith(f"| {train.metric} |"))
    assert line in text and fmt(train.value, train.unit) in line  # our measured training throughput
    assert "Measured matmul GFLOP/s" in text  # the machine and roofline come with the table
    # a bench of another configuration describes another model: refused, and nothing is written
    other = run_bench(NanoGPTLMHeadModel(tiny(n_layers=1)), batch=1, seq=16, repeats=1, warmup=0)
    write_outputs(other, tmp_path / "other")
    with pytest.raises(UserError, match="n_layers 1.*this model's 2"):
        hf.export(exported["ckpt"], tmp_path / "o2", bench=read_bench_table(str(tmp_path / "other")))
    assert not (tmp_path / "o2").exists()
    # the command reads the table (export takes it as data): a torn or missing one is refused there
    (tmp_path / "torn.json").write_text('{"config": {')
    for bench, words in (("torn.json", "not a `nanogpt bench` bench.json"), ("missing", "no bench results")):
        argv = ["export", "--model", str(exported["ckpt"]), "--out", str(tmp_path / "o3")]
        assert cli.main([*argv, "--bench", str(tmp_path / bench)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("nanogpt export: error: ") and words in err, err
        assert not (tmp_path / "o3").exists()


def test_export_never_imports_the_bench():
    """The command reads a bench table and hands it to export as data (`BenchTable`), so no module of
    nanogpt.export imports nanogpt.bench, at the top of a file or inside a function."""
    for path in Path(hf.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[:2] == ["nanogpt", "bench"] for n in names), (path, names)


@pytest.mark.parametrize(
    ("changes", "word"),
    [
        ({"norm_position": "post"}, "norm_position"),
        ({"bias": False}, "bias"),
        ({"tie_embeddings": False}, "tie"),
    ],
)
def test_gpt2_refuses_what_it_cannot_express(tmp_path, changes, word, capsys):
    make_ckpt(tmp_path / "ckpt", tiny(**changes))
    rc = cli.main(
        ["export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "o"), "--format", "gpt2"]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and word in err and "--format remote-code" in err
    assert not (tmp_path / "o").exists()


def test_out_folder_not_ours_needs_force(exported, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="did not write.*--force"):
        hf.export(exported["ckpt"], out)
    assert (out / "notes.txt").read_text() == "keep me"
    hf.export(exported["ckpt"], out, force=True)
    assert not (out / "notes.txt").exists() and (out / MARKER).is_file()
    hf.export(exported["ckpt"], out, "gpt2")  # our own export may be overwritten without --force
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"


def test_bad_checkpoint_and_bad_hf_folders(exported, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    make_ckpt(bad, tiny())
    sd = load_file(str(bad / "model.safetensors"))
    del sd["transformer.ln_f.bias"]
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(UserError, match="ln_f.bias"):
        hf.export(bad, tmp_path / "o1")
    # a truncated safetensors file in an HF folder
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_bytes((exported["gpt2"] / "config.json").read_bytes())
    (trunc / "model.safetensors").write_bytes((exported["gpt2"] / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(UserError, match="corrupt or truncated"):
        hf.import_hf(trunc, tmp_path / "o2")
    # another architecture
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(UserError, match="'llama' model"):
        import_main(["--hf", str(llama), "--out", str(tmp_path / "o3")])
    with pytest.raises(UserError, match="config.json not found"):
        hf.import_hf(tmp_path / "nowhere", tmp_path / "o4")


def test_push_to_hub_without_token_fails_before_any_work(exported, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "o"
    with pytest.raises(UserError, match="HF_TOKEN"):
        export_main(["--model", str(exported["ckpt"]), "--out", str(out), "--push-to-hub", "me/nanogpt"])
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["remote-code", "gpt2"])
def test_an_export_made_for_a_hub_repo_loads_from_the_repo_in_its_snippet(exported, tmp_path, fmt):
    """`--push-to-hub REPO`: the published README's snippet names REPO, never the local folder (no network)."""
    out = tmp_path / "for_hub"
    text = (hf.export(exported["ckpt"], out, fmt, repo="someone/nanogpt-tiny").out / "README.md").read_text()
    assert 'from_pretrained("someone/nanogpt-tiny"' in text
    assert str(out) not in text
