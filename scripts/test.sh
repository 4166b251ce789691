#!/usr/bin/env bash
# The project's test command: set-up included, on a fresh machine. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q tests "$@"
