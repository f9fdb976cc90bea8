#!/usr/bin/env bash
# Creates .venv and installs the package with its test tools on a fresh machine.
# torch is pinned to the CPU build first, so no multi-GB CUDA build is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q -e ".[test]"
