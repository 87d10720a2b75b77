#!/usr/bin/env bash
# One-step set-up on a fresh machine: torch from the local wheels (a bare `pip install torch`
# would pull several GB), then the project with its test and plot extras (or $PVL_EXTRAS), editable.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import torch, torchvision" 2>/dev/null; then
  python3 -m pip install --quiet torch==2.14.1 torchvision==0.29.1
fi
python3 -m pip install --quiet -e ".[${PVL_EXTRAS:-test,plot}]"
# pyenv installs console scripts behind shims that need a rehash to appear on PATH.
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
