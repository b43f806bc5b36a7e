#!/usr/bin/env bash
# Issue 17's GPU figures in one prepared run, for a session lent a GPU (the device tool runs it
# in the repository root; figures land under $OUT, or bench/results without it):
#   1. the CUDA tests of the distance kernels (int8 and float32 products, the stacked path,
#      the batched refinement) — they are skipped on machines without a GPU;
#   2. bench/detect.py on the GPU: shard rows of 8 prompts at 64×64 and 256×256, N = 500 (int8
#      products grouped over prompts where they are small, and ungrouped for comparison), with
#      the float32 and int8 peaks measured in the same process and one profiled call per row.
# Usage: bash bench/gpu_detect.sh   (about 3–5 minutes on an H100/H200)
set -euo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
python -m pytest -q -rs tests/test_distances.py tests/test_detect_batched.py -k cuda 2>&1 | tee "$out/detect_cuda_tests.log"
python bench/detect.py --device cuda --sizes 64 256 --threads 0 --reps 3 --shard 8 --profile \
    --json "$out/detect_cuda.json" 2>&1 | tee "$out/detect_cuda.log"
