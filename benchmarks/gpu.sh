#!/usr/bin/env bash
# GPU checks and timings for sessions that are lent a CUDA machine: < 5 minutes on one GPU.
# Run from the repository root after the set-up in the README (a CUDA build of torch is needed:
# pip install torch, unpinned, on the GPU machine). Every script prints its table and writes JSON
# under benchmarks/out/; copy the tables into benchmarks/RESULTS.md with the card's name.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
$PY - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
# 1. correctness: the same runs on CUDA and on the CPU agree (fast full/projected, exact)        ~1 min
$PY benchmarks/gpu_check.py
# 2. tracking overhead vs plain training, ResNet8 / LeNet5 / SmallCNN / MLP, k = 1024           ~1 min
$PY benchmarks/overhead.py --device cuda --repeats 10
# 3. time to the first ranking vs Captum TracInCP, and batched vs looped HVPs                   ~2 min
$PY benchmarks/field_speed.py --device cuda --repeats 2
# 4. query throughput on a ~400 MB store, test gradients on the GPU                             ~1 min
$PY benchmarks/query_throughput.py --device cuda --samples 30000 --repeats 2
