#!/usr/bin/env bash
# Everything this project measures on a GPU, in one call: GPU tests, then each benchmark (JSON under $OUT).
#   OUT=bench/results bash bench/run_gpu.sh [tests|kernels|decode|prefill|quant|train ...]   (default: all)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
steps=${*:-tests kernels decode prefill quant train}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Result files are named after the GPU (kernels_h200.json, ...) so runs on different cards sit side by side.
TAG=${TAG:-$(python -c "import re, torch; print(re.sub(r'[^a-z0-9]', '', torch.cuda.get_device_name().lower().replace('nvidia', ''))[:8])")}
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
for s in $steps; do
  echo "=== $s ($(date +%T))"
  case $s in
    tests)   # Triton compilation dominates the GPU tests: spread them over processes when pytest-xdist is there.
             par=$(python -c "import xdist" 2>/dev/null && echo "-n 6")
             python -m pytest -q -m gpu tests -p no:cacheprovider -rf $par 2>&1 | tee "$OUT/gpu_tests.log" | tail -60 ;;
    kernels) python -m bench.kernels --out "$OUT/kernels_${TAG}.json" ;;
    decode)  python -m bench.decode --out "$OUT/decode_${TAG}.json" ;;
    prefill) python -m bench.prefill --out "$OUT/prefill_${TAG}.json" ;;
    quant)   for q in int8 int4; do
               python -m bench.decode --quant $q --batch-sizes 1,8 --contexts 128,4096 --out "$OUT/decode_${q}_${TAG}.json"
             done ;;
    train)   python -m bench.report_train --out "$OUT/report_train_${TAG}.json" ;;
  esac
done
echo "=== done ($(date +%T))"
