#!/usr/bin/env bash
# The README's test command: set up everything the suite needs, then run all of it.
set -euo pipefail
cd "$(dirname "$0")/.."
PVL_EXTRAS=test,plot,cluster bash scripts/setup.sh  # the scale-out tests start Ray and Milvus Lite
# The PostgreSQL tests start a private server from the Debian binaries.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
fi
# The web page test drives Debian's headless Chromium through its chromedriver.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# Lint first: one style, checked (configuration in pyproject.toml).
ruff check .
python3 -m pytest -q "$@"
