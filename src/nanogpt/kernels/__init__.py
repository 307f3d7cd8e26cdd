"""What makes the network fast on each device, behind two small interfaces.

For the model (`model/gpt.py`), three stock operations made faster where they can be (`ops.py`):
`causal_attention` (SDPA; blocked, with a cheaper dropout mask, in CPU training), `dropout` (F.dropout)
and `linear_cross_entropy` (the head's loss without its (N, vocab) logits).

For the decode loop (`infer/generate.py`, `serve/`), one object (`decode.py`): `Decoder(model, dtype)`,
whose `prefill` and `step` run the model's calls with weight copies made for one-token steps and the CPU
kernels they need. Neither the model nor the decode loop knows more of it. `compiled.py`: its optional
one-token step through `torch.compile` over a static view of the cache (`Decoder(..., compile=True)`).

`quant.py`: weight-only int8 `Int8Linear` / `Int8Embedding` for inference (`--dtype int8`, `apply_dtype`).

`device.py`: device resolution, autocast, CPU threads and the allocator tuning every command shares. This
layer sits below `model/` and never imports it (docs/architecture.md).

    from nanogpt.kernels import causal_attention, dropout, linear_cross_entropy
"""

from nanogpt.kernels.decode import Decoder
from nanogpt.kernels.ops import causal_attention, dropout, linear_cross_entropy

__all__ = ["causal_attention", "dropout", "linear_cross_entropy", "Decoder"]
