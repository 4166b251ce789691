#!/usr/bin/env bash
# The main job: set-up, then the loss next to the standard materialized-logits loss.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python launch/demo.py "$@"
