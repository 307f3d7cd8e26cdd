"""`export --adapter-only`: PEFT loads our adapter folder on our exported base and gives our logits, for the
remote-code names and for GPT-2's Conv1D names (fan_in_fan_out). Merged export equals it too."""

from __future__ import annotations

import pytest
import torch

from nanogpt import cli
from nanogpt.export.hf import FORMATS
from nanogpt.train.checkpoint import load_model

pytestmark = pytest.mark.ecosystem


@pytest.mark.parametrize("fmt", FORMATS)
def test_peft_loads_our_adapter_with_our_logits(fmt, base, lora_run, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert cli.main(["export", "--model", str(base), "--out", str(tmp_path / "base"), "--format", fmt]) == 0
    argv = ["export", "--model", str(lora_run), "--out", str(tmp_path / "adapter"), "--format", fmt]
    assert cli.main([*argv, "--adapter-only"]) == 0
    assert (
        cli.main(["export", "--model", str(lora_run), "--out", str(tmp_path / "merged"), "--format", fmt])
        == 0
    )
    hf_base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), trust_remote_code=True)
    peft_model = PeftModel.from_pretrained(hf_base, str(tmp_path / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), trust_remote_code=True).eval()
    x = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_model(lora_run)(x)
        theirs = peft_model(input_ids=x).logits
        exported = merged(input_ids=x).logits
        with peft_model.disable_adapter():
            without = peft_model(input_ids=x).logits
    assert (theirs - ours).abs().max().item() < 1e-4
    assert (exported - ours).abs().max().item() < 1e-4
    assert (without - ours).abs().max().item() > 1e-3  # the adapters matter: a no-op adapter would pass above
