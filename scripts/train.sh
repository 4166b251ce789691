#!/usr/bin/env bash
# The main job: set-up, then a GPT with a vocabulary-parallel output layer trained twice on two
# ranks (cce-dist's loss and the materialized one), with a comparison table and a loss plot.
# Extra args go to launch/compare.py / launch/train.py (e.g. --steps 500 --vocab-size 64000);
# `bash scripts/train.sh --help` lists them all with their defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
export CCE_DIST_PROG="bash scripts/train.sh"
# The options are checked (and --help answered) before the set-up: the launcher's option code
# needs only the standard library, so any Python >= 3.10 serves until .venv exists.
py=.venv/bin/python
[ -x "$py" ] || py=${PYTHON:-python3}
for arg in "$@"; do
  if [ "$arg" = -h ] || [ "$arg" = --help ]; then
    cat <<'EOF'
bash scripts/train.sh: the main job. Sets up .venv first (scripts/setup.sh: torch, triton,
cce-dist and what the job imports), then runs launch/compare.py with the options below: a GPT
with a vocabulary-parallel output layer trained twice (cce-dist's loss, then the materialized
one), each run under torchrun on --nproc ranks, then a comparison table and out/loss_curves.png.
Environment: NPROC sets the default of --nproc (2); PYTHON the interpreter that creates .venv.

EOF
    exec "$py" launch/compare.py --help
  fi
done
"$py" launch/compare.py --nproc "${NPROC:-2}" "$@" --check-args
bash scripts/setup.sh
. .venv/bin/activate
exec python launch/compare.py --nproc "${NPROC:-2}" "$@"
