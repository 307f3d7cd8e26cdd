"""nanogpt: train, distill, evaluate, benchmark and publish small GPT language models.

Packages by job, in layers that import one way only: docs/architecture.md.

    from nanogpt.config import preset
    from nanogpt.model.gpt import NanoGPTLMHeadModel
    model = NanoGPTLMHeadModel(preset("card"))
"""

__version__ = "0.1.0"
