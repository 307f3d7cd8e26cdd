"""Hugging Face export and import (`nanogpt export`, `nanogpt import`); see `nanogpt.export.hf`.

transformers is needed only to load an export, not to write one: this package imports neither
transformers nor the templates, which are copied into each exported folder as they are.

    from nanogpt.export.hf import export, import_hf
"""
