"""Both export formats driven by the heavy tools people point at a Hugging Face folder: the `Trainer` with
gradient accumulation, `torch.export` with dynamic shapes, ONNX (the dynamo exporter) run by ONNX Runtime,
`torch.compile(fullgraph=True)` with inductor, and PEFT LoRA through merge, save and reload. Offline, on tiny
models. `scripts/test_ecosystem.sh` installs the `ecosystem` extra and runs these; docs/export.md tabulates them.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing below may touch the network

from transformers import AutoModelForCausalLM  # noqa: E402

from nanogpt.export import hf  # noqa: E402

pytestmark = pytest.mark.ecosystem
CONTEXT = 128  # the tiny exports' context length


def load(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, **kwargs)


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (B, T), generator=torch.Generator().manual_seed(seed))


def left_padded(B: int, T: int, pads: list[int]) -> torch.Tensor:
    """An attention mask whose row i starts with pads[i] padding positions."""
    mask = torch.ones(B, T, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- Trainer


def train_one_step(folder, out, batch: int, accumulate: int, rows: list[dict], **args) -> tuple[float, dict]:
    """One optimizer step of the Trainer over `rows` -> (the logged loss, the weights after the step)."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model = load(folder)
    training = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulate,
        max_steps=1,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **args,
    )
    trainer = Trainer(model=model, args=training, train_dataset=rows)
    trainer.train()
    return trainer.state.log_history[0]["loss"], weights(model)


@pytest.mark.parametrize("fmt", hf.FORMATS)
def test_trainer_gradient_accumulation_matches_one_big_batch(tiny_exports, fmt, tmp_path):
    """GA=4 at batch 1 is GA=1 at batch 4 over the same four samples: the same logged loss (the mean over every
    counted token, not 4x it) and the same weights after the step, with gradient checkpointing too."""
    ids = tokens(4, 24)
    rows = []
    for i in range(4):  # rows count different numbers of tokens: a mean of per-batch means would differ
        labels = ids[i].clone()
        labels[: 5 * i] = -100
        rows.append({"input_ids": ids[i], "labels": labels})
    folder = tiny_exports[fmt]
    loss1, w1 = train_one_step(folder, tmp_path / "a", 4, 1, rows)
    loss4, w4 = train_one_step(folder, tmp_path / "b", 1, 4, rows)
    loss4c, w4c = train_one_step(folder, tmp_path / "c", 1, 4, rows, gradient_checkpointing=True)
    model = load(folder).eval()
    labels = torch.stack([r["labels"] for r in rows])
    with torch.no_grad():
        mean = model(ids, labels=labels).loss.item()  # over all 4 samples' counted tokens
    # The Trainer divides by its own count of tokens, labels[:, 1:] for a model whose loss_type is ForCausalLM
    # (ours: then the logged loss is that mean). transformers' GPT2LMHeadModel has none (its name does not end in
    # ForCausalLM), so the Trainer also counts labels[:, 0]: the same at every accumulation, but a lower figure.
    shifted, counted = int((labels[:, 1:] != -100).sum()), int((labels != -100).sum())
    expected = mean if fmt == "remote-code" else mean * shifted / counted
    diff = max((w1[k] - w4[k]).abs().max().item() for k in w1)
    diff_c = max((w1[k] - w4c[k]).abs().max().item() for k in w1)
    print(
        f"{fmt}: logged loss {loss1:.6f} / {loss4:.6f} / {loss4c:.6f}, mean {mean:.6f}; weights {diff:.3g} {diff_c:.3g}"
    )
    for loss in (loss1, loss4, loss4c):
        assert loss == pytest.approx(expected, rel=1e-4)
    assert diff <= 1e-5 and diff_c <= 1e-5
    assert max((w1[k] - weights(model)[k]).abs().max().item() for k in w1) > 1e-4  # the step did move them


# ---------------------------------------------------------------- torch.export, ONNX, torch.compile


@pytest.mark.parametrize("fmt", hf.FORMATS)
def test_torch_export_with_dynamic_batch_and_length(tiny_exports, fmt):
    model = load(tiny_exports[fmt]).eval()
    model.config.use_cache = False  # a cache object is not a traceable output
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=CONTEXT)
    program = torch.export.export(
        model,
        (tokens(2, 16),),
        {"attention_mask": left_padded(2, 16, [0, 5])},
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    x, mask = tokens(3, 40, seed=1), left_padded(3, 40, [0, 7, 1])  # other shapes than traced
    with torch.no_grad():
        got, ref = program.module()(x, attention_mask=mask).logits, model(x, attention_mask=mask).logits
    diff = (got - ref)[mask.bool()].abs().max().item()
    print(f"torch.export {fmt}: max |logit diff| {diff:.3g}")
    assert diff < 1e-5


@pytest.mark.parametrize("fmt", hf.FORMATS)
def test_onnx_runtime_matches_pytorch(tiny_exports, fmt, tmp_path):
    """torch.onnx.export(dynamo=True) with a dynamic batch and length; ONNX Runtime at other shapes, left
    padding included, gives PyTorch's logits."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = load(tiny_exports[fmt]).eval()
    model.config.use_cache = False
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=CONTEXT)
    program = torch.onnx.export(
        model,
        (tokens(2, 16),),
        kwargs={"attention_mask": left_padded(2, 16, [0, 5])},
        dynamo=True,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    program.save(str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    for x, mask in [
        (tokens(3, 40, seed=1), left_padded(3, 40, [0, 7, 1])),
        (tokens(1, 5), left_padded(1, 5, [0])),
    ]:
        (logits,) = session.run(["logits"], {"input_ids": x.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            ref = model(x, attention_mask=mask).logits
        diff = (torch.from_numpy(logits) - ref)[mask.bool()].abs().max().item()
        print(f"ONNX Runtime {fmt} {tuple(x.shape)}: max |logit diff| {diff:.3g}")
        assert diff < 1e-4


@pytest.mark.parametrize("fmt", hf.FORMATS)
def test_compile_fullgraph_with_inductor(tiny_exports, fmt):
    """The default backend, generated code and all; fullgraph=True raises on any graph break."""
    torch._dynamo.reset()
    model = load(tiny_exports[fmt]).eval()
    model.config.use_cache = False
    compiled = torch.compile(model, fullgraph=True)
    x, mask = tokens(2, 24), left_padded(2, 24, [0, 6])
    with torch.no_grad():
        got, ref = compiled(x, attention_mask=mask).logits, model(x, attention_mask=mask).logits
    diff = (got - ref)[mask.bool()].abs().max().item()
    print(f"torch.compile {fmt}: max |logit diff| {diff:.3g}")
    assert diff < 1e-4


# ---------------------------------------------------------------- PEFT


def card_lora_targets(folder) -> list[str] | None:
    """The target_modules of the LoraConfig in the export's model card, None where the card names none."""
    m = re.search(r"LoraConfig\(.*target_modules=\[([^\]]*)\]", (folder / "README.md").read_text())
    return re.findall(r'"(\w+)"', m[1]) if m else None


def lora_wrapped(model) -> set[str]:
    """The names of the layers PEFT gave an adapter ("transformer.blocks.0.attn.qkv_proj.lora_A..." -> qkv_proj)."""
    return {
        name.split(".lora_A.")[0].rsplit(".", 1)[-1]
        for name, _ in model.named_parameters()
        if ".lora_A." in name
    }


@pytest.mark.parametrize("fmt", hf.FORMATS)
def test_peft_lora_trains_merges_saves_and_reloads(tiny_exports, fmt, tmp_path):
    """LoRA with the target modules the model card gives (PEFT's own defaults for gpt2): the loss falls, and the
    merged model, saved and loaded back through from_pretrained, gives the same logits."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    folder = tiny_exports[fmt]
    targets = card_lora_targets(folder)
    assert (targets is None) == (fmt == "gpt2")
    base = load(folder)
    before = weights(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    wrapped = lora_wrapped(model)
    assert wrapped == (set(targets) if targets else {"c_attn"})
    x = tokens(2, 24)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    print(f"LoRA {fmt}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0] - 0.05
    merged = model.merge_and_unload().eval()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = load(tmp_path / "merged").eval()
    with torch.no_grad():
        ours, back = merged(x).logits, reloaded(x).logits
    diff = (ours - back).abs().max().item()
    print(f"LoRA {fmt}: merged vs reloaded max |logit diff| {diff:.3g}")
    assert diff <= 1e-5
    assert type(reloaded).__name__ == type(merged).__name__
    assert max((before[k] - v).abs().max().item() for k, v in weights(reloaded).items()) > 1e-4  # merged in


def test_peft_all_linear_picks_the_card_targets(tiny_exports):
    """The card's other spelling: "all-linear" wraps the same four layers and leaves the tied head alone."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    folder = tiny_exports["remote-code"]
    model = get_peft_model(load(folder), LoraConfig(r=4, target_modules="all-linear"))
    wrapped = lora_wrapped(model)
    assert wrapped == set(card_lora_targets(folder))
