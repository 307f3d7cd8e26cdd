#!/usr/bin/env bash
# Quickstart 1: install, then run the main job (prepare the builtin corpus, train, evaluate, export, sample).
# The extras are those the README's commands need (hf: export and HF comparisons, data: Parquet and HF
# datasets, serve: the server, gguf: the GGUF export), so every command there runs in this .venv; MLX,
# platform-specific, is left out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh hf,data,serve,gguf
. .venv/bin/activate
exec nanogpt demo "$@"
