#!/usr/bin/env bash
# Lint (ruff, 150-column limit) and run the test suite (fast tiny-model tests and the slow real-model
# ones). Extra args go to pytest, e.g. scripts/test.sh -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# The tests marked vllm need vLLM in its own venv; without it they skip (SOFTPROMPT_NO_VLLM=1: don't build it).
if [ -z "${SOFTPROMPT_NO_VLLM:-}" ] && [ ! -x .venv-vllm/bin/python ]; then
  scripts/vllm_venv.sh || echo "scripts/vllm_venv.sh failed: the tests marked vllm will skip" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check --quiet . || { echo "ruff found problems (above): fix them, or see pyproject [tool.ruff]" >&2; exit 1; }
# --durations: the slowest tests, so a slow CI run says where its time went.
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
