# Sourced by the device scripts: $OUT, the carried wheels (.whl/) installed to /tmp/site, and
# the environment every run there needs.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# .whl/deepspeed/ holds DeepSpeed and the packages it needs beyond the device's own.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl $(ls .whl/deepspeed/*.whl 2>/dev/null) && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
