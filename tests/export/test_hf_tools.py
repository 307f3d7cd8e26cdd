"""Exported folders with the rest of transformers and torch, offline and quick: activation checkpointing,
attention weights, the loss under gradient accumulation, whole-graph tracing, the context bound, the
tokenizer. The heavy tools (Trainer, ONNX Runtime, inductor, PEFT) are in test_ecosystem.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing below may touch the network

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from nanogpt.export import hf  # noqa: E402

V5 = int(transformers.__version__.split(".")[0]) >= 5
N_LAYERS, N_HEADS = 2, 4  # tests/tiny.py
# each format's name for its dropout probabilities
DROPOUT = {
    "remote-code": {"dropout": 0.1},
    "gpt2": {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1},
}


def load(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, **kwargs)


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (B, T), generator=torch.Generator().manual_seed(seed))


def left_padded(B: int, T: int, pad: int) -> torch.Tensor:
    """An attention mask whose second row starts with `pad` padding positions."""
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :pad] = 0
    return mask


def blocks(model, fmt: str):
    return model.transformer.blocks if fmt == "remote-code" else model.transformer.h


@pytest.mark.parametrize("fmt", hf.FORMATS)
def test_gradient_checkpointing_recomputes_and_keeps_the_gradients(tiny_exports, fmt):
    """gradient_checkpointing_enable() is accepted, runs each block again in the backward pass, and changes no
    gradient, with dropout on (the checkpoint replays the same random masks)."""
    x = tokens(3, 20)
    grads, calls = [], []
    for checkpointing in (False, True):
        model = load(tiny_exports[fmt], **DROPOUT[fmt]).train()
        if checkpointing:
            with warnings.catch_warnings():  # transformers 5 renames it activation_checkpointing_enable
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable()
        ran = []
        # each block's attention, counted as it starts: a recomputation stops once it has what the backward
        # pass needs, before any post-hook, and transformers' GPT-2 checkpoints inside the block's own call
        for block in blocks(model, fmt):
            block.attn.register_forward_pre_hook(lambda *_, ran=ran: ran.append(1))
        torch.manual_seed(1)  # the same dropout masks in both runs
        model(x, labels=x).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
        calls.append(len(ran))
    assert calls == [N_LAYERS, 2 * N_LAYERS]
    diff = max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0])
    print(f"max |grad diff| with checkpointing, {fmt}: {diff:.3g}")
    assert diff <= 1e-6


@pytest.mark.parametrize("fmt", hf.FORMATS)
def test_eager_attention_returns_the_weights(tiny_exports, fmt):
    eager, sdpa = load(tiny_exports[fmt], attn_implementation="eager").eval(), load(tiny_exports[fmt]).eval()
    x, mask = tokens(2, 12), left_padded(2, 12, pad=4)
    with torch.no_grad():
        out = eager(x, attention_mask=mask, output_attentions=True)
        ref = sdpa(x, attention_mask=mask)
    assert len(out.attentions) == N_LAYERS
    for w in out.attentions:
        assert w.shape == (2, N_HEADS, 12, 12)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, N_HEADS, 12), atol=1e-6, rtol=0)
        real_queries = w * mask[:, None, :, None]  # what a padding position sees is each model's own business
        assert (real_queries.triu(1) == 0).all()  # causal: no query sees a later key
        assert (w[1, :, 4:, :4] == 0).all()  # real tokens never see the padding
    real = mask.bool()
    diff = (out.logits - ref.logits)[real].abs().max().item()
    print(f"max |logit diff| eager vs sdpa, {fmt}: {diff:.3g}")
    assert diff < 1e-5
    # generate() hands the flag on at every step: the prompt's weights, then one query over the cache
    gen = eager.generate(
        x,
        attention_mask=mask,
        max_new_tokens=2,
        do_sample=False,
        output_attentions=True,
        return_dict_in_generate=True,
        pad_token_id=50256,
    )
    assert [step[0].shape for step in gen.attentions] == [(2, N_HEADS, 12, 12), (2, N_HEADS, 1, 13)]


def test_sdpa_refuses_output_attentions(tiny_exports):
    """SDPA never forms the weights: a clear error that names the fix, never a silent attentions=None."""
    model = load(tiny_exports["remote-code"]).eval()
    with pytest.raises(ValueError, match='output_attentions=True needs .*attn_implementation="eager"'):
        model(tokens(1, 8), output_attentions=True)


def test_loss_honours_num_items_in_batch_as_transformers_does(tiny_exports):
    """The Trainer's gradient-accumulation contract: the sum of token losses / num_items_in_batch, the mean
    without it; transformers' own causal-LM loss function is the reference."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = load(tiny_exports["remote-code"]).eval()
    x = tokens(3, 16)
    labels = x.clone()
    labels[0, :5] = -100  # rows count different numbers of tokens
    labels[2, 10:] = -100
    counted = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        logits = model(x).logits
        per_token = F.cross_entropy(
            logits[:, :-1].reshape(-1, 50257), labels[:, 1:].reshape(-1), reduction="none", ignore_index=-100
        )
        for n in (None, 4 * counted, torch.tensor(4 * counted)):
            kwargs = {} if n is None else {"num_items_in_batch": n}
            loss = model(x, labels=labels, **kwargs).loss
            torch.testing.assert_close(
                loss, per_token.sum() / (counted if n is None else int(n)), rtol=1e-6, atol=0
            )
            torch.testing.assert_close(
                loss, ForCausalLMLoss(logits, labels, 50257, **kwargs), rtol=1e-6, atol=0
            )
        # a collator's pre-shifted labels (padding-free batches) win over labels, as in transformers' loss
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
        shifted[1] = -100  # unlike labels, they leave row 1 out
        loss = model(x, labels=labels, shift_labels=shifted, num_items_in_batch=counted).loss
        torch.testing.assert_close(loss, per_token.view(3, 15)[[0, 2]].sum() / counted, rtol=1e-6, atol=0)
    assert model.accepts_loss_kwargs and model.loss_type == "ForCausalLM"  # what the Trainer reads


def test_export_and_compile_trace_the_whole_forward(tiny_exports):
    """No value is read back in forward: torch.export and a fullgraph compile (which raises on any graph break)
    take the model whole, padding mask included, and compute what eager mode does."""
    model = load(tiny_exports["remote-code"]).eval()
    model.config.use_cache = False  # a cache object is not a traceable output
    x, mask = tokens(2, 16), left_padded(2, 16, pad=5)
    program = torch.export.export(model, (x,), {"attention_mask": mask})
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # dynamo's graph capture, no codegen
    y = tokens(2, 16, seed=1)  # other values, the same shapes
    for m in (left_padded(2, 16, pad=3), torch.ones(2, 16, dtype=torch.long)):
        with torch.no_grad():
            ref = model(y, attention_mask=m).logits
            torch.testing.assert_close(program.module()(y, attention_mask=m).logits, ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(compiled(y, attention_mask=m).logits, ref, atol=1e-5, rtol=0)


def test_positions_past_the_context_are_refused(tiny_exports):
    model = load(tiny_exports["remote-code"]).eval()
    with pytest.raises(ValueError, match="129 positions .* exceed the context of 128 tokens"):
        model(tokens(1, 129))
    with pytest.raises(ValueError, match="exceed the context of 128 tokens"):
        model.generate(tokens(1, 120), max_new_tokens=20, do_sample=False, pad_token_id=50256)
    out = model.generate(tokens(1, 120), max_new_tokens=8, do_sample=False, pad_token_id=50256)
    assert out.shape == (1, 128)  # up to the last position is fine


# Loads the tokenizer of the folder in argv[1] each way named in argv[2:], printing a marker line after each, so
# that whatever transformers prints (a question, a warning) lands between the markers of the load that caused it.
TOKENIZER_LOADS = """
import sys
from transformers import AutoTokenizer, GPT2TokenizerFast

folder = sys.argv[1]
ways = {
    "GPT2TokenizerFast": lambda: GPT2TokenizerFast.from_pretrained(folder),
    "AutoTokenizer+trust": lambda: AutoTokenizer.from_pretrained(folder, trust_remote_code=True),
    "AutoTokenizer": lambda: AutoTokenizer.from_pretrained(folder),
}
for way in sys.argv[2:]:
    tok = ways[way]()
    print(f"@@ {way} pad={tok.pad_token}/{tok.pad_token_id} ids={tok('Hello world')['input_ids']}")
"""
NOISE = ("custom code", "trust_remote_code", "model of type", "[y/N]")


def tokenizer_loads(folder, ways: list[str]) -> dict[str, tuple[str, str]]:
    """way -> (its marker line, what was printed while it loaded), from a fresh process with stdin closed."""
    r = subprocess.run(
        [sys.executable, "-u", "-c", TOKENIZER_LOADS, str(folder), *ways],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream, in order
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-2000:]
    result, chatter = {}, []
    for line in r.stdout.replace("[y/N] ", "[y/N]\n").splitlines():
        if line.startswith("@@ "):
            result[line.split()[1]] = (line, "\n".join(chatter))
            chatter = []
        else:
            chatter.append(line)
    return result


@pytest.mark.parametrize("fmt", hf.FORMATS)
def test_tokenizer_has_a_pad_token_and_loads_without_custom_code(tiny_exports, fmt):
    """A stock GPT-2 tokenizer with pad = eos; GPT2TokenizerFast (and AutoTokenizer, where transformers allows)
    loads it with no question and no warning."""
    quiet = ["GPT2TokenizerFast", "AutoTokenizer+trust"]
    if fmt == "gpt2" or not V5:  # transformers 4 reads tokenizer_config.json's class before any config
        quiet.append("AutoTokenizer")
    loads = tokenizer_loads(tiny_exports[fmt], quiet)
    assert list(loads) == quiet
    for way, (line, chatter) in loads.items():
        assert line.endswith("pad=<|endoftext|>/50256 ids=[15496, 995]"), line
        assert not any(word in chatter for word in NOISE), (way, chatter)


def test_model_card_gives_the_tokenizer_call_that_does_not_ask(tiny_exports):
    """The card's snippet asks on transformers 5 (pinned below, no folder layout avoids it): right under it,
    the README says so and prints the call that is silent. That call, copied from the README and run in a
    fresh process with stdin closed, loads the tokenizer with nothing printed."""
    folder = tiny_exports["remote-code"]
    readme = (folder / "README.md").read_text()
    calls = re.findall(r"^tokenizer = AutoTokenizer\.from_pretrained\(.*\)$", readme, flags=re.M)
    assert calls[0] == f'tokenizer = AutoTokenizer.from_pretrained("{folder}")'  # the card's own line
    assert len(calls) == 2 and "[y/N]" in readme.split(calls[0])[1].split(calls[1])[0]  # explained between
    show = "print('@@', tokenizer('Hello world')['input_ids'])"
    code = f"from transformers import AutoTokenizer\n{calls[1]}\n{show}"
    r = subprocess.run(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-2000:]
    assert r.stdout == "@@ [15496, 995]\n"  # no question, no "model of type" warning, nothing else


@pytest.mark.skipif(not V5, reason="transformers 4 loads this tokenizer without asking")
def test_autotokenizer_asks_about_remote_code_on_transformers_5(tiny_exports):
    """What the model card says: transformers 5's AutoTokenizer loads config.json (whose auto_map names custom
    code) before tokenizer_config.json, so no file in the folder can stop the question. If this fails,
    transformers changed: update the model card, docs/export.md and the test above."""
    (line, chatter) = tokenizer_loads(tiny_exports["remote-code"], ["AutoTokenizer"])["AutoTokenizer"]
    assert line.endswith("ids=[15496, 995]")  # declining still loads the stock tokenizer
    assert "[y/N]" in chatter and "model of type `nanogpt`" in chatter
