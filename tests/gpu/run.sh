#!/usr/bin/env bash
# The GPU checks in one script, for a machine with an NVIDIA GPU:
#   1. the GPU tests (tests/gpu/) and the device tests that also run on CPU (tests/test_device.py);
#   2. `hpcdl bench dp --device cuda` at 2 ranks sharing the GPUs (DDP on gloo: NCCL refuses two ranks on one
#      GPU) and at 1 rank (DDP on NCCL).
#
#   bash tests/gpu/run.sh [OUT_DIR]        # figures and logs in OUT_DIR (default: $OUT, else runs/gpu)
#
# MPI: the mpiexec on PATH; on a machine without one, the MPICH and mpi4py wheels in .whl/ are installed
# into /tmp/hpcdl-mpi first (pip download them for that machine's Python; see README, GPUs).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-${OUT:-runs/gpu}}
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Open MPI refuses root without these (the GPU machines here run commands as root); MPICH ignores them.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

if ! command -v mpiexec >/dev/null; then
  if ! ls .whl/mpich-*.whl >/dev/null 2>&1; then
    echo "tests/gpu/run.sh: no mpiexec on PATH and no MPICH wheel in .whl/: install an MPI first" >&2
    exit 2
  fi
  prefix=/tmp/hpcdl-mpi
  $PY -m pip install -q --no-index --no-deps --no-compile --ignore-installed --prefix "$prefix" .whl/mpich-*.whl .whl/mpi4py-*.whl || exit 2
  site=$($PY -c 'import sys; print(f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages")')
  export PATH=$prefix/bin:$PATH LD_LIBRARY_PATH=$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export PYTHONPATH=$PYTHONPATH:$prefix/$site
fi

{
  nvidia-smi -L
  $PY - <<'PYEOF'
import torch
from mpi4py import MPI
from hpcdl.device import cuda_aware_mpi
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print(MPI.Get_library_version().splitlines()[0], "| CUDA-aware:", cuda_aware_mpi())
PYEOF
} 2>&1 | tee "$out/env.txt"

status=0
$PY -m pytest -q -rs -p no:cacheprovider tests/gpu tests/test_device.py 2>&1 | tee "$out/tests.log"
((${PIPESTATUS[0]} == 0)) || status=1

for ranks in 2 1; do
  models=$([[ $ranks == 2 ]] && echo mlp,cnn || echo mlp)
  timeout 300 $PY -m hpcdl bench dp --device cuda --ranks "$ranks" --models "$models" --repeats 2 \
    --json "$out/bench-dp-gpu-$ranks.json" 2>&1 | tee "$out/bench-dp-gpu-$ranks.log"
  ((${PIPESTATUS[0]} == 0)) || status=1
done
echo "tests/gpu/run.sh: exit $status; figures in $out"
exit $status
