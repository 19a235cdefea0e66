#!/usr/bin/env bash
# Start vLLM (from .venv-vllm, see scripts/vllm_venv.sh) on the embedded SmolLM2 with prompt embeds
# enabled, for `softprompt serve --engine vllm --upstream http://127.0.0.1:8001`.
#   bash scripts/serve_vllm.sh [MODEL_DIR] [extra vllm serve flags...]
# Environment: PORT (8001), HOST (127.0.0.1), DTYPE (float32: exact comparison with our engine on CPU),
# MAX_MODEL_LEN (2048), VLLM_CPU_KVCACHE_SPACE (GiB of KV cache on CPU, default 1), EAGER=1 (no torch.compile:
# starts in seconds instead of minutes on a small CPU, runs slower), BLOCK_SIZE (KV block; vLLM's CPU default is 128
# tokens and its prefix cache shares whole blocks only: a shorter shared prefix needs e.g. 32).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-.venv-vllm}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "serve_vllm.sh: $VENV has no vllm: run 'bash scripts/vllm_venv.sh' first" >&2
  exit 2
fi
MODEL_DIR="${1:-}"
if [ -n "$MODEL_DIR" ] && [ "${MODEL_DIR#-}" = "$MODEL_DIR" ]; then
  shift
else
  MAIN_PY="${SOFTPROMPT_PYTHON:-.venv/bin/python}"
  [ -x "$MAIN_PY" ] || MAIN_PY=python3
  MODEL_DIR="$(PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$MAIN_PY" -c \
    "from softprompt.base_model import ensure_embedded; print(ensure_embedded('smollm2'))")"
fi
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_TARGET_DEVICE=cpu
# `vllm serve` itself dies in vllm-cpu 0.32.0 (its --version asks for the package "vllm", which is installed
# as "vllm-cpu"); the OpenAI server module takes the same flags.
exec "$VENV/bin/python" -W ignore::DeprecationWarning -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
  --enable-prompt-embeds --enable-prefix-caching \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8001}" --dtype "${DTYPE:-float32}" \
  --max-model-len "${MAX_MODEL_LEN:-2048}" --served-model-name "${SERVED_NAME:-smollm2}" \
  ${EAGER:+--enforce-eager} ${BLOCK_SIZE:+--block-size "$BLOCK_SIZE"} "$@"
