#!/usr/bin/env bash
# LoRA Lab installer for Linux and macOS.
#   ./install.sh              install (or update) .venv, then launch the app
#   ./install.sh --no-launch  install only
#   ./install.sh --test       install with test tools, then run the test suite
# Extra arguments after the mode flag are passed to app.py (or to pytest with --test).
# Environment: PYTHON (interpreter to use), TORCH_SPEC (e.g. "torch==2.13.0"),
# TORCH_INDEX_URL (e.g. a CUDA or CPU wheel index of your choice).
set -euo pipefail
cd "$(dirname "$0")"

mode=launch
case "${1:-}" in
  --no-launch) mode=install; shift ;;
  --test) mode=test; shift ;;
esac

PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "LoRA Lab needs Python 3.10 or newer, and '$PY' was not found. Install Python, or set PYTHON=/path/to/python3." >&2
  exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  echo "LoRA Lab needs Python 3.10 or newer; '$PY' is $("$PY" -V 2>&1). Install a newer Python or set PYTHON=." >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv ..."
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python

reqs=requirements.txt
[ "$mode" = test ] && reqs=requirements-dev.txt
if [ -z "${TORCH_SPEC:-}" ]; then
  # A CUDA build where an NVIDIA GPU is present, otherwise the CPU release this project is tested on.
  if command -v nvidia-smi >/dev/null 2>&1; then TORCH_SPEC="torch>=2.5"; else TORCH_SPEC="torch==2.13.0"; fi
fi
stamp=".venv/.lora-lab-installed"
want="$(cat requirements.txt "$reqs" | cksum) $TORCH_SPEC"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing PyTorch ($TORCH_SPEC) ..."
  if ! "$VPY" -c 'import torch' 2>/dev/null; then
    "$VPY" -m pip install --upgrade pip >/dev/null
    "$VPY" -m pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
  fi
  echo "Installing LoRA Lab's requirements ($reqs) ..."
  "$VPY" -m pip install -r "$reqs"
  "$VPY" -c 'import torch, diffusers, peft, transformers, safetensors, yaml' || {
    echo "The install finished but the libraries do not import; see the messages above." >&2; exit 1; }
  echo "$want" > "$stamp"
else
  echo "Requirements already installed (delete .venv to reinstall)."
fi

case "$mode" in
  launch) exec "$VPY" app.py "$@" ;;
  test) exec "$VPY" -m pytest -q "$@" ;;
  install) echo "Installed. Launch with: .venv/bin/python app.py" ;;
esac
