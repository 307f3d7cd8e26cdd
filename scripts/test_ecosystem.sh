#!/usr/bin/env bash
# The ecosystem tests: our exports and commands driven by heavy third-party tools (ONNX Runtime, llama.cpp,
# lm-eval, PEFT, trackers). Installs the `ecosystem` extra beside `dev` and llama.cpp's prebuilt runtime
# (node-llama-cpp, pinned in tests/export/gguf_runner), then runs only those tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev,ecosystem
. .venv/bin/activate
if [ ! -d tests/export/gguf_runner/node_modules ]; then
  (cd tests/export/gguf_runner && npm ci --ignore-scripts --no-audit --no-fund --silent)
fi
exec python -m pytest -m ecosystem "$@"
