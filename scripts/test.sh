#!/usr/bin/env bash
# Quickstart 2: install with the test extras, then run the default test suite (slow and gpu markers excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
. .venv/bin/activate
exec python -m pytest "$@"
