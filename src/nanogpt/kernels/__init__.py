"""What makes the network fast on each device, behind two small interfaces.

For the model (`model/gpt.py`), three stock operations made faster where they can be (`ops.py`):
`causal_attention` (SDPA; blocked, with a cheaper dropout mask, in CPU training), `dropout` (F.dropout)
and `linear_cross_entropy` (the head's loss without its (N, vocab) logits).

For the decode loop (`infer/generate.py`, `serve/`), the hook of `decode.py`: `prepare_decode_weights`
gives the model's `nn.Linear` layers weight copies made for one-token steps, `decode_step` wraps each
step, `drop_decode_weights` frees them. The model knows nothing of it.

`quant.py`: weight-only int8 `Int8Linear` / `Int8Embedding` for inference (`--dtype int8`, `apply_dtype`).

`device.py`: device resolution, autocast, CPU threads and the allocator tuning every command shares. This
layer sits below `model/` and never imports it (docs/architecture.md).

    from nanogpt.kernels import causal_attention, dropout, linear_cross_entropy
"""

from nanogpt.kernels.decode import decode_step, drop_decode_weights, prepare_decode_weights
from nanogpt.kernels.ops import causal_attention, dropout, linear_cross_entropy

__all__ = [
    "causal_attention",
    "dropout",
    "linear_cross_entropy",
    "prepare_decode_weights",
    "decode_step",
    "drop_decode_weights",
]
