#!/usr/bin/env bash
# The project's test command: set-up included, on a fresh machine. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# DeepSpeed JIT-builds a small op on first use: keep the build inside the workspace.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
python -m pytest -q tests "$@"
