#!/usr/bin/env bash
# The main job end to end on the embedded SmolLM2: train a soft prompt on the topic task shipped in
# examples/topic, compare it with a hand-written prompt on held-out examples, save it, generate.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python examples/topic/demo.py "$@"
