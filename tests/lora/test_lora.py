"""LoRA in PyTorch: the trainable parameters, the merge, the small adapter checkpoint, and every loader
applying the adapters to the recorded base (moved or changed base refused)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanogpt.errors import UserError
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.model.lora import (
    LoRASpec,
    adapter_shapes,
    adapter_state,
    apply_lora,
    merge_lora,
    trainable_count,
)
from nanogpt.train.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_record
from nanogpt.train.checkpoint import WEIGHTS, load_model, load_weights, resolve_checkpoint
from tests.lora.conftest import RANK
from tests.tiny import tiny_config

ALL = ("qkv_proj", "out_proj", "fc1", "fc2")


@pytest.mark.parametrize("targets", [ALL, ("qkv_proj",), ("out_proj", "fc2")])
@pytest.mark.parametrize("rank", [1, 8])
def test_trainable_parameters_are_exactly_the_adapters(targets, rank):
    cfg = tiny_config()
    model = apply_lora(NanoGPTLMHeadModel(cfg), LoRASpec(rank, 16.0, 0.0, targets))
    d, f = cfg.d_model, cfg.d_ff
    fan = {"qkv_proj": (d, 3 * d), "out_proj": (d, d), "fc1": (d, f), "fc2": (f, d)}
    expected = cfg.n_layers * sum(rank * (i + o) for t, (i, o) in fan.items() if t in targets)
    assert trainable_count(model) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        k.replace(".weight", "") for k in adapter_shapes(cfg, LoRASpec(rank, 16.0, 0.0, targets))
    }
    assert {k: tuple(v.shape) for k, v in adapter_state(model).items()} == adapter_shapes(
        cfg, LoRASpec(rank, 16.0, 0.0, targets)
    )


def test_fresh_adapters_leave_the_output_unchanged_and_merge_is_base_plus_ba_scale():
    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(tiny_config()).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 50257, (2, 16))
    before = model(x)
    spec = LoRASpec(RANK, 8.0, 0.0, ALL)
    apply_lora(model, spec)
    assert torch.equal(model(x), before)  # B = 0
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B, std=0.1)
    adapted = model(x)
    adapters = adapter_state(model)
    merge_lora(model)
    name = "transformer.blocks.1.attn.qkv_proj"
    a, b = adapters[f"{name}.lora_A.weight"], adapters[f"{name}.lora_B.weight"]
    assert spec.scale == 2.0
    torch.testing.assert_close(model.state_dict()[f"{name}.weight"], base[f"{name}.weight"] + b @ a * 2.0)
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
    assert not any(hasattr(m, "lora_A") for m in model.modules())


def test_run_checkpoint_holds_only_small_adapters_and_the_base_record(lora_run, base):
    for sub in ("best", "last"):
        folder = lora_run / sub
        assert not (folder / WEIGHTS).exists()
        assert (folder / ADAPTER_WEIGHTS).stat().st_size < (base / WEIGHTS).stat().st_size / 50
    record = read_record(lora_run / "last")
    assert record.base == base.resolve() and record.spec.rank == RANK
    assert set(load_file(str(lora_run / "last" / ADAPTER_WEIGHTS))) == set(
        adapter_shapes(tiny_config(), record.spec)
    )


def test_loaders_apply_the_adapters_to_the_base(lora_run, base):
    """load_model (sample, eval, serve, bench, export all load through it) gives base + B @ A * scale."""
    record = read_record(lora_run / "last")
    adapters = load_file(str(lora_run / "last" / ADAPTER_WEIGHTS))
    base_sd = load_weights(base)
    merged = load_model(lora_run / "last").state_dict()
    moved = 0
    for key, w in base_sd.items():
        module = key.removesuffix(".weight")
        if f"{module}.lora_A.weight" in adapters:
            a, b = adapters[f"{module}.lora_A.weight"], adapters[f"{module}.lora_B.weight"]
            torch.testing.assert_close(merged[key], w + b @ a * record.spec.scale)
            moved += int(not torch.equal(merged[key], w))
        else:
            assert torch.equal(merged[key], w), key  # the base is frozen
    assert moved == len(adapters) // 2  # training moved every adapted layer


def test_init_from_a_lora_run_starts_from_its_merged_weights(lora_run, small_data, tmp_path):
    from nanogpt.train.loop import train
    from tests.tiny import quick_train_config

    out = tmp_path / "full"
    # one step at a negligible rate: the checkpoint it writes holds the weights it started from, to 1e-9
    cfg = quick_train_config(max_iters=1, learning_rate=1e-12, min_lr=0.0, weight_decay=0.0)
    train(tiny_config(), cfg, small_data, out, init_from=str(lora_run), progress=False)
    want, base = load_model(lora_run).state_dict(), load_weights(read_record(lora_run / "last").base)
    got = load_model(out / "last").state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-9, rtol=0)
    assert any(not torch.equal(want[k], base[k]) for k in base)  # the adapters are in, not the bare base


def test_moved_base_is_refused_in_one_line(lora_run, base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    moved = tmp_path / "moved"
    shutil.move(str(base), moved)
    try:
        with pytest.raises(UserError, match="is not there") as e:
            load_model(run)
        assert str(base.resolve()) in str(e.value) and ADAPTER_CONFIG in str(e.value)
    finally:
        shutil.move(str(moved), base)
    load_model(run)


def test_changed_base_is_refused_in_one_line(lora_run, base, tmp_path):
    shutil.copytree(base, tmp_path / "base")
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    sd = load_file(str(tmp_path / "base" / WEIGHTS))
    sd["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"] + 1.0
    save_file(sd, str(tmp_path / "base" / WEIGHTS))
    record = (run / "last" / ADAPTER_CONFIG).read_text().replace(str(base.resolve()), str(tmp_path / "base"))
    (run / "last" / ADAPTER_CONFIG).write_text(record)
    with pytest.raises(UserError, match="has changed") as e:
        load_model(run / "last")
    assert "\n" not in str(e.value) and "train the adapters again" in str(e.value)
    assert resolve_checkpoint(run / "last") == run / "last"


def test_an_imported_gpt2_is_a_lora_base(small_data, tmp_path):
    """A GPT-2 written by transformers, imported with `nanogpt import`, takes adapters like any run: the run
    records it, loaders merge onto it, and the merged export loads in transformers with our logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from nanogpt.export import hf
    from nanogpt.train.checkpoint import load_config_of
    from nanogpt.train.loop import train
    from tests.tiny import quick_train_config

    conf = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=50257)
    torch.manual_seed(0)
    GPT2LMHeadModel(conf).save_pretrained(tmp_path / "gpt2")
    hf.import_hf(tmp_path / "gpt2", tmp_path / "imported")
    cfg = quick_train_config(lora_rank=RANK, learning_rate=1e-2, weight_decay=0.0)
    model_cfg = load_config_of(tmp_path / "imported")  # as `train --init-from` takes it: GPT-2's tanh GELU
    train(model_cfg, cfg, small_data, tmp_path / "run", init_from=str(tmp_path / "imported"), progress=False)

    record = read_record(tmp_path / "run" / "last")
    assert record.base.resolve() == (tmp_path / "imported").resolve()
    base_sd, merged = load_weights(record.base), load_model(tmp_path / "run" / "last")
    changed = [k for k, w in base_sd.items() if not torch.equal(merged.state_dict()[k], w)]
    assert changed and all(
        k.endswith(("qkv_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight")) for k in changed
    )

    hf.export(tmp_path / "run" / "last", tmp_path / "export", fmt="gpt2")
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    x = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, merged.eval()(x), atol=1e-5, rtol=0)
