#!/usr/bin/env bash
# GPU checks and timings for sessions that are lent a CUDA machine: about 8 minutes on one GPU (estimated:
# no session has had a GPU yet, so the per-step times below are guesses from the CPU runs).
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
# 1. correctness: the same runs on CUDA and on the CPU agree (fast full/projected, exact, replay) ~1.5 min
$PY benchmarks/gpu_check.py
# 2. tracking overhead vs plain training, ResNet8 / LeNet5 / SmallCNN / MLP, k = 1024           ~1 min
$PY benchmarks/overhead.py --device cuda --repeats 10
#    the same at batch 256 (issue 17's GPU target: <= 1.2x), and the replay-only recording        ~1.5 min
$PY benchmarks/overhead.py --device cuda --repeats 10 --models ResNet8 LeNet5 --batch-size 256 --out overhead_cuda_b256
$PY benchmarks/overhead.py --device cuda --repeats 10 --models ResNet8 LeNet5 --mode replay --out overhead_cuda_replay
# 3. time to the first ranking vs Captum TracInCP, and batched vs looped HVPs                   ~2 min
$PY benchmarks/field_speed.py --device cuda --repeats 2
# 4. query throughput on a ~400 MB store, test gradients on the GPU                             ~1 min
$PY benchmarks/query_throughput.py --device cuda --samples 30000 --repeats 2
# 5. one exact query by replay (all samples) against plain training, 1 and 8 test points         ~1.5 min
$PY benchmarks/replay_cost.py --device cuda --models LeNet5 ResNet8 --tests 1 8 --epochs 1 --repeats 2
