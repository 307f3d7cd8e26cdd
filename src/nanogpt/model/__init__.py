"""The network: the card's Pre-LN GPT (`gpt.py`, module names as the card prints them) and its KV cache.

It reads top to bottom; what makes it fast lives in `nanogpt.kernels`.

    from nanogpt.model import NanoGPTLMHeadModel
"""

from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.model.kv_cache import KVCache

__all__ = ["NanoGPTLMHeadModel", "KVCache"]
