#!/usr/bin/env bash
# Runs the black-box FHIR client tests against a running server:
#
#   tests/clients/run.sh BASE_URL        # e.g. http://127.0.0.1:8080/4_0_0
#
# Installs the pinned client packages (requirements.txt) into $REPO/.local/venv/clients once,
# and again whenever requirements.txt changes (its hash is kept in the venv), under a lock so
# two concurrent runs do not both install. Then runs fhirpy_crud.py with that venv's python.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV_ROOT="$REPO/.local/venv"
VENV="$VENV_ROOT/clients"
REQS="$HERE/requirements.txt"
PYTHON="${PYTHON:-python3}"

if [ $# -ne 1 ]; then
  echo "usage: $0 BASE_URL   (e.g. http://127.0.0.1:8080/4_0_0)" >&2
  exit 2
fi
BASE_URL="$1"

want="$(sha256sum "$REQS" | cut -d' ' -f1)"
mkdir -p "$VENV_ROOT"
exec 8>"$VENV_ROOT/.clients.lock"
flock 8
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  echo "clients: installing $(basename "$REQS") into $VENV" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQS"
  echo "$want" > "$VENV/.requirements.sha256"
fi
flock -u 8
exec 8>&-

"$VENV/bin/python" "$HERE/fhirpy_crud.py" "$BASE_URL"
