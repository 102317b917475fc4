#!/usr/bin/env bash
# Create (or update) the project's isolated environment in .venv.
# A torch that the base interpreter already has (for example a CUDA build) is kept by
# letting the venv see the system site-packages; torch==2.13.0 is installed only where no
# torch exists at all, because any other torch request pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: keeping the existing torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/pip" install --quiet torch==2.13.0
fi
"$VENV/bin/pip" install --quiet -e ".[dev]"
touch "$VENV/.installed"
