#!/usr/bin/env bash
# System packages deelm's C core builds against: a C compiler, pkg-config and
# OpenBLAS (the OpenMP build, so OpenBLAS and deelm share one thread runtime).
set -euo pipefail
if pkg-config --exists openblas 2>/dev/null && command -v gcc >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "deelm needs pkg-config, a C compiler and OpenBLAS; install them with your package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq gcc pkg-config libopenblas-openmp-dev
