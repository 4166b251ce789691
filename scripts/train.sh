#!/usr/bin/env bash
# The main job: set-up, then a GPT with a vocabulary-parallel output layer trained twice on two
# ranks (cce-dist's loss and the materialized one), with a comparison table and a loss plot.
# Extra args go to launch/compare.py / launch/train.py (e.g. --steps 500 --vocab-size 64000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python launch/compare.py --nproc "${NPROC:-2}" "$@"
