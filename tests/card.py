"""What the model card states, verbatim: the tests that check our card model against it share these."""

from __future__ import annotations

from typing import Any

CARD_TREE = """\
NanoGPTLMHeadModel(
  (transformer): NanoGPTModel(
    (token_embedding): Embedding(50257, 384)
    (position_embedding): Embedding(512, 384)
    (blocks): ModuleList(
      (0-7): 8 x NanoGPTBlock(
        (ln1): LayerNorm((384,), eps=1e-05)
        (attn): NanoGPTAttention(
          (qkv_proj): Linear(384, 1152)
          (out_proj): Linear(384, 384)
        )
        (ln2): LayerNorm((384,), eps=1e-05)
        (ff): FeedForward(
          (fc1): Linear(384, 1536)
          (fc2): Linear(1536, 384)
        )
      )
    )
    (ln_f): LayerNorm((384,), eps=1e-05)
  )
  (lm_head): Linear(384, 50257)
)"""

CARD_TRAINING_CONFIGURATION: dict[str, Any] = {  # the card's "Training Configuration" block, verbatim
    "vocab_size": 50257,
    "d_model": 384,
    "n_layers": 8,
    "n_heads": 8,
    "d_ff": 1536,
    "context_length": 512,
    "dropout": 0.1,
    "batch_size": 12,
    "learning_rate": 3e-4,
    "weight_decay": 0.1,
    "max_iters": 20000,
}
