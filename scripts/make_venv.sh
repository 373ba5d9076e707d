#!/usr/bin/env bash
# Creates .venv with Python 3.12 (if missing) and installs the pinned requirements file given as $1.
# A stamp file records which requirements were installed, so a second run is instant.
set -euo pipefail
req=${1:-requirements.txt}
venv=.venv

find_python() {
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    command -v python3.12; return
  fi
  if command -v pyenv >/dev/null 2>&1; then
    local root; root=$(pyenv root)
    for p in "$root"/versions/3.12.*/bin/python3.12; do
      [ -x "$p" ] && { echo "$p"; return; }
    done
  fi
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  py=$(find_python) || {
    echo "error: Python 3.12 is required (jax >= 0.11 needs it) but was not found." >&2
    echo "       Install it (for example 'pyenv install 3.12') or put python3.12 on PATH, then rerun." >&2
    exit 1
  }
  echo "creating $venv with $py"
  "$py" -m venv "$venv"
fi

stamp="$venv/.installed-$(basename "$req")"
if [ ! -f "$stamp" ] || [ "$req" -nt "$stamp" ] || [ requirements.txt -nt "$stamp" ]; then
  echo "installing $req into $venv (first time takes a few minutes)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r "$req"
  "$venv/bin/python" -m pip install --quiet --no-deps -e .
  touch "$stamp"
fi
