"""The network: the card's Pre-LN GPT (`gpt.py`, module names as the card prints them) and its KV cache.

It reads top to bottom and holds nothing but the network: no I/O, no device or thread logic, no weight
layouts for speed. What makes it fast lives in `nanogpt.kernels` and plugs in through one narrow hook.

    from nanogpt.model import NanoGPTLMHeadModel
"""

from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.model.kv_cache import KVCache

__all__ = ["NanoGPTLMHeadModel", "KVCache"]
