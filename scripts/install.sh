#!/usr/bin/env bash
# Creates a venv (if missing) and installs searchagent into it. The one install script: the
# Makefile and deploy/Dockerfile both call it.
# Usage: scripts/install.sh [--no-editable] [VENV_DIR] [EXTRAS]
#   VENV_DIR   default .venv
#   EXTRAS     default torch,test (embedded engine, training, test tools); an empty string ""
#              installs the core service only, without torch (the remote-engine mode)
#   --no-editable  copy the package into the venv instead of linking this checkout (images)
set -euo pipefail
editable=(-e)
if [ "${1-}" = "--no-editable" ]; then
    editable=()
    shift
fi
venv="${1:-.venv}"
extras="${2-torch,test}"  # `-`, not `:-`: an explicitly empty EXTRAS means no extras
here="$(cd "$(dirname "$0")/.." && pwd)"
spec="$here"
[ -z "$extras" ] || spec="$here[$extras]"  # pip reads `dir[]` as a path named so: no brackets
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -c "$here/constraints.txt" "${editable[@]}" "$spec"
