#!/usr/bin/env bash
# Everything only a GPU can show, in one call on a lent GPU machine (the project's device tool
# runs it from the repository root; the machine has no network and 15 minutes in all):
#   1. the CUDA tests (Triton pixel-shuffle kernel, pinned-buffer transfers, CUDA export paths);
#   2. `sv-deploy bench` on the GPU: the paper's 2D and 3D tasks, fast and full recipe, on torch
#      eager (CUDA) and ONNX Runtime where its CUDA provider exists, training with the paper's
#      recipe and ours; then torch compiled on the 3D task.
# Each step has its own time limit (120 + 270 + 100 s, room left for the install within 600 s) so a
# slow one cannot eat the others'; what each wrote lands in
# $OUT (or ./gpu-check here): gpu.txt, tests.txt, bench/ and bench_compiled/ (json, md, png) and their logs.
#
#   device run:  bash benchmarks/gpu_check.sh          (timeout_s 600)
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The machine's torch (CUDA build), triton, onnx and the rest are used as they are: no downloads.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.txt" 2>&1 \
  || { ln -sfn ../kernels sv_deploy/kernels; export PYTHONPATH="$PWD"; }  # the same layout, uninstalled
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, onnxruntime as o; print('torch', torch.__version__, torch.cuda.get_device_name(0), \
'| triton', triton.__version__, '| onnxruntime', o.__version__, o.get_available_providers())"
  nproc; git log -1 --format='commit %h %cd' --date=iso; date -u
} 2>&1 | tee "$OUT/gpu.txt"

echo "== CUDA tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernel.py tests/test_cuda_io.py 2>&1 \
  | tee "$OUT/tests.txt" | tail -15

echo "== bench on the GPU: torch eager (and ONNX Runtime's CUDA provider where installed), training"
timeout 270 python3 -m sv_deploy bench "$OUT/bench" --runs 3 --backend "eager (cuda)" --backend "onnxruntime (cuda)" \
  2>&1 | tee "$OUT/bench.log" | tail -40
echo "== bench: torch compiled on the GPU, 3D only (compiles once per pass shape: last, in what time is left)"
timeout 100 python3 -m sv_deploy bench "$OUT/bench_compiled" --runs 3 --task 3d --no-training --backend "compiled (cuda)" \
  2>&1 | tee "$OUT/bench_compiled.log" | tail -20
echo "== done"
