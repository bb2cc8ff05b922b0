#!/usr/bin/env bash
# The GPU verification of the measurement code, in two parts that each fit a 10-minute command:
#
#   bash benchmarks/gpu_session.sh check  OUTDIR   # GPU-marked tests + benchmarks/check_timing.py
#   bash benchmarks/gpu_session.sh suites OUTDIR   # the three reference suites on the GPU
#   bash benchmarks/gpu_session.sh reproduce OUTDIR  # Swin's Table 5 and NAT's speed comparison (issue 14)
#
# Each part writes OUTDIR/<part>.log and OUTDIR/<part>.tgz (the run folders, packed so that a
# machine that returns only a few files returns them whole). Wheels in .whl/ (made here with
# benchmarks/device_wheels.sh, for a GPU image without fvcore or pydantic) are installed into
# /tmp/site first. Exit code: 2 without a CUDA GPU, else that of the last failing step (0: all passed).
set -uo pipefail
part=${1:?usage: gpu_session.sh check|suites|reproduce OUTDIR}
out=${2:?usage: gpu_session.sh check|suites|reproduce OUTDIR}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mkdir -p "$out/$part"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site:$root${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)" \
  || { echo "gpu_session: needs a CUDA GPU (torch sees none)" >&2; exit 2; }
rc=0
step() { echo "=== $*"; "$@" || { rc=$?; echo "=== exit $rc: $*"; }; }
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit,temperature.gpu --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  case $part in
    check)
      step python3 -m pytest -q -m gpu tests
      step python3 benchmarks/check_timing.py --out "$out/$part/check_timing" ;;
    suites)
      for s in resolution_sweep swin_shift local_attention; do
        step python3 -m attnbench run "suites/$s.yaml" --out "$out/$part/$s-gpu" --no-progress
      done ;;
    reproduce)
      for name in swin-table5 nat-speed; do
        step python3 -m attnbench reproduce "$name" --results-root "$out/$part" --no-progress
      done ;;
    *) echo "gpu_session: unknown part '$part' (check, suites or reproduce)"; rc=2 ;;
  esac
  echo "$rc" > "$out/$part/rc"
} 2>&1 | tee "$out/$part.log"
tar czf "$out/$part.tgz" -C "$out" "$part"
exit "$(cat "$out/$part/rc")"
