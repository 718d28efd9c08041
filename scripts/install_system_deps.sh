#!/usr/bin/env bash
# System packages deelm's C core builds with: a C compiler with OpenMP (gcc).
set -euo pipefail
if command -v gcc >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "deelm needs a C compiler with OpenMP (gcc); install it with your package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq gcc
