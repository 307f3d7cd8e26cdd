#!/usr/bin/env bash
# Quickstart 1: install, then run the main job (prepare the builtin corpus, train, evaluate, export, sample).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh hf
. .venv/bin/activate
exec nanogpt demo "$@"
