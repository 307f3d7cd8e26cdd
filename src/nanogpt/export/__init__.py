"""Exports and import: Hugging Face folders (`nanogpt.export.hf`: `nanogpt export`, `nanogpt import`) and
GGUF files for llama.cpp, Ollama and LM Studio (`nanogpt.export.gguf`: `nanogpt export --format gguf`).

transformers is needed only to load an export, not to write one: this package imports neither
transformers nor the templates, which are copied into each exported folder as they are. `gguf`, llama.cpp's
writer library, is imported only when a GGUF is written.

    from nanogpt.export.hf import export, import_hf
    from nanogpt.export.gguf import export_gguf
"""
