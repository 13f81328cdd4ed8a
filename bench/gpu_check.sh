#!/usr/bin/env bash
# The GPU check (issue 14, part 5): on a CUDA machine, within 8 minutes,
#   1. prints the GPU (nvidia-smi, and torch's view: name, memory, compute capability, bf16),
#   2. runs the CUDA-marked tests (tests/test_cuda.py: the sparse step against the CPU, pinned
#      copies, fused Adam, a bf16 run, 2-GPU NCCL data parallelism when there are 2 GPUs),
#   3. runs the benchmark suite on the GPU (bench/train_step.py, bench/topk.py and, with 2 GPUs
#      or more, bench/ddp_step.py over all of them),
#   4. runs a short pipeline in bf16 (bench/gpu_pipeline.py: prepare, cache, train topk and
#      batchtopk, baseline, evaluate, on SmolLM2-135M from ../shared/data).
# Each part prints its start time; the whole run is stopped by `timeout` after
# GPU_CHECK_TIMEOUT seconds (480 by default) and then fails. Record the printed numbers in
# docs/performance.md.
#
# --dry-run: the same steps on the CPU with tiny shapes and a random tiny Llama (the CUDA tests
# are collected and skip), so the script itself is tested without a GPU
# (tests/test_gpu_check.py).
# Usage: bash bench/gpu_check.sh [--dry-run] [--out DIR]    (PYTHON=... to use another python)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${GPU_CHECK_INNER:-}" ]; then
    exec timeout "${GPU_CHECK_TIMEOUT:-480}" env GPU_CHECK_INNER=1 bash "$0" "$@"
fi
DRY=0
OUT=${TMPDIR:-/tmp}/saelab-gpu-check
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT=$2; shift ;;
        *) echo "usage: bash bench/gpu_check.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)
part() { echo "== $1 (at $(( $(date +%s) - start )) s)"; }

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    STEP=(--shapes 32x256 --batch 256 --k 4 --repeats 1 --variants topk batchtopk switch --no-dense)
    TOPK=(--batch 64 --repeats 1)
    DDP=(--shape 32x256 --batch 256 --k 4 --steps 2 --warmup 1 --procs 2)
    PIPE=(--tiny)
    echo "gpu_check: dry run on the CPU, tiny shapes"
else
    DEVICE=cuda
    STEP=(--shapes 576x4608 768x16384 --repeats 5)
    TOPK=(--repeats 5)
    DDP=()
    PIPE=()
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi

part "device"
"$PY" - "$DEVICE" <<'PYEOF'
import sys

import torch

device = sys.argv[1]
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA GPU (a CPU wheel? see TORCH_SPEC in scripts/setup.sh)")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, "
              f"compute capability {p.major}.{p.minor}, native bf16 {bf16}")
PYEOF

part "CUDA-marked tests"
"$PY" -m pytest -q -m cuda tests/test_cuda.py -rs -p no:cacheprovider --basetemp="$OUT/pytest"

part "bench/train_step.py"
"$PY" bench/train_step.py --device "$DEVICE" "${STEP[@]}"

part "bench/topk.py"
"$PY" bench/topk.py --device "$DEVICE" "${TOPK[@]}"

if [ "$DEVICE" = cpu ]; then
    part "bench/ddp_step.py (2 gloo processes)"
    "$PY" bench/ddp_step.py "${DDP[@]}"
else
    n=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    if [ "$n" -ge 2 ]; then
        part "bench/ddp_step.py ($n GPUs, NCCL)"
        "$PY" bench/ddp_step.py --device cuda --procs "$n"
    fi
fi

part "short bf16 pipeline"
"$PY" bench/gpu_pipeline.py --out "$OUT/pipeline" --device "$DEVICE" "${PIPE[@]}"

echo "gpu_check: all parts passed in $(( $(date +%s) - start )) s"
