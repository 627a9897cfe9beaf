#!/usr/bin/env bash
# The whole test suite from a fresh clone, set-up included (CI runs this as root via .ci/run):
#   - Debian's chromium for the browser tests (apt-get; needs root) unless /usr/bin/chromium exists,
#   - a virtualenv with the CPU torch wheel and the test + browser extras,
#   - js/: npm ci, then the vitest unit tests,
#   - python -m pytest (engine, widgets, the bundle/wheel checks, JupyterLab + Chromium end to end).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not browser"` or `-x -q`.
# Browser screenshots: build/browser-screenshots/ (or $HYDRA_SCREENSHOTS), printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

if [ -z "${HYDRA_CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing chromium (apt)"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
  else
    echo "WARNING: /usr/bin/chromium is missing and this is not root: the browser tests will fail." >&2
    echo "         sudo apt-get install -y chromium" >&2
  fi
fi

echo "== python environment"
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e ".[test,browser]"

echo "== front end: npm ci, vitest"
(cd js && npm ci --no-audit --no-fund --loglevel=error && npm test --silent)

echo "== pytest"
HYDRA_REQUIRE_JS=1 .venv/bin/python -m pytest "$@"
echo "== all tests passed in $((SECONDS - start)) s"
