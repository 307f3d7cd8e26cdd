#!/usr/bin/env bash
# The playground's browser tests (marker `browser`): a real `nanogpt serve` and Debian's headless Chromium, driven
# by Playwright (the `browser` extra). Chromium comes from apt (`chromium`, and `chromium-driver` for Selenium
# users), installed here when missing; Playwright's own `install` step is never run (it downloads a browser
# build, which cannot work offline).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi
bash scripts/install.sh dev,browser
. .venv/bin/activate
exec python -m pytest -m browser "$@"
