#!/usr/bin/env bash
# Create ./.venv (if needed) and install nanogpt into it with the given extras, e.g. `scripts/install.sh dev`
# or `scripts/install.sh hf,data,serve` (comma-separated: pip's `.[a,b]`).
# When torch is missing, the pinned CPU wheel is installed first: an unpinned torch would pull a multi-GB CUDA build.
# (On a CUDA machine, install the torch build you want into .venv before running this.)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
if [ -n "$extras" ]; then
  python -m pip install -q -e ".[$extras]"
else
  python -m pip install -q -e .
fi
