#!/usr/bin/env bash
# The ecosystem tests: our exports and commands driven by heavy third-party tools (ONNX Runtime, llama.cpp,
# lm-eval, PEFT, trackers). Installs the `ecosystem` extra beside `dev`, then runs only those tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev,ecosystem
. .venv/bin/activate
exec python -m pytest -m ecosystem "$@"
