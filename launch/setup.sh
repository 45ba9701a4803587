#!/usr/bin/env bash
# One-time set-up on a fresh machine: the Fashion-MNIST files (Debian) and a virtualenv in .venv.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# Data: torchvision cannot download without a network, so take Debian's package where we can.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist; torchvision will try to download"
  fi
fi

# Python environment: the package with its test extras, editable.
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import sm_dist, torch, torchvision, yaml, rich, pytest" 2>/dev/null \
   || [ setup.cfg -nt .venv/.sm-dist-installed ]; then
  echo "setup: installing sm-dist and its dependencies into .venv (torch is large: minutes)"
  .venv/bin/python -m pip install -q -e ".[test]"
  touch .venv/.sm-dist-installed
fi
