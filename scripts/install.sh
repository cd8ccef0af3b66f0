#!/usr/bin/env bash
# Creates .venv (if missing) and installs searchagent with the embedded engine, training and test
# tools. The one install script: the Makefile calls it, and so will the Dockerfile.
# Usage: scripts/install.sh [VENV_DIR] [EXTRAS]   (defaults: .venv torch,test)
set -euo pipefail
venv="${1:-.venv}"
extras="${2:-torch,test}"
here="$(cd "$(dirname "$0")/.." && pwd)"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -c "$here/constraints.txt" -e "$here[$extras]"
