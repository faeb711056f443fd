#!/usr/bin/env bash
# Everything this project measures on a GPU, in one call: GPU tests, then each benchmark (JSON under $OUT).
#   OUT=bench/results [PART=k/n] bash bench/run_gpu.sh [tests|pdl|decode|decode-batch|quant|quant-gemv|train|
#                                                        train-ckpt-full|train-mixed|train-qlora|tp|prefill|kernels|
#                                                        checkop ...]
# (default: all). STEP_TIMEOUT (seconds, default 900) bounds each step, so one slow step cannot eat a lease. Each
# step is sized to fit one 10-minute device call (an H200 on 2026-12-02: decode-batch ~5-8 min; train ~8.5 min;
# train-ckpt-full 7 min; train-qlora ~3 min; quant ~8 min, estimated from its rows); the benchmarks rewrite their
# JSON after every row, so a step cut short keeps what it finished.
set -uo pipefail
export PYTHONUNBUFFERED=1
# NVLink multicast stays off (the lent multi-GPU machines require it; harmless on one GPU).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-bench/results}
STEP_TIMEOUT=${STEP_TIMEOUT:-900}
mkdir -p "$OUT"
steps=${*:-tests pdl decode decode-batch quant quant-gemv train train-ckpt-full train-mixed train-qlora tp prefill checkop
          kernels}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Result files are named after the GPU (decode_h200.json, ...) so runs on different cards sit side by side.
TAG=${TAG:-$(python -c "import re, torch; print(re.sub(r'[^a-z0-9]', '', torch.cuda.get_device_name().lower().replace('nvidia', ''))[:8])")}
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
par=$(python -c "import xdist" 2>/dev/null && echo "-n ${WORKERS:-12}")
step() { timeout "$STEP_TIMEOUT" "$@" || echo "step failed or timed out (rc $?): $*"; }
for s in $steps; do
  echo "=== $s ($(date +%T))"
  case $s in
    tests)   # Triton compilation dominates the GPU tests: spread them over processes when pytest-xdist is there.
             # The contract tests run their full grid on CUDA; the parallel and tutorial tests have GPU branches.
             # -v names each result as it lands, so a step cut by its timeout still says which tests failed
             # (a -q summary prints only at the end); the whole log is kept under $OUT.
             # PART=k/n runs every n-th GPU test from the k-th (the whole set takes ~17 min on an H200 with 12-15
             # workers, more than one 10-minute device call: PART=1/2 and PART=2/2 in two calls).
             sel="-m gpu tests"
             if [ -n "${PART:-}" ]; then
               sel=$(python -m pytest --collect-only -q -m gpu tests -p no:cacheprovider 2>/dev/null | grep "^tests/.*::" \
                     | awk -v k="${PART%/*}" -v n="${PART#*/}" '(NR - k) % n == 0')
             fi
             # pytest-timeout (where installed) ends one stuck test with its traceback instead of the whole step.
             limit=$(python -c "import pytest_timeout" 2>/dev/null && echo "--timeout 300")
             step python -m pytest -v $sel -p no:cacheprovider -rf $par -W ignore $limit 2>&1 \
               | tee "$OUT/gpu_tests${PART:+_part${PART%/*}}.log" | grep -E "FAILED|ERROR|passed|failed"
             if [ -z "${PART:-}" ] || [ "${PART%/*}" = "${PART#*/}" ]; then  # once, with the last part
               step python -m pytest -v tests/test_contracts.py tests/test_parallel.py tests/test_tutorial.py \
                 -p no:cacheprovider -rf $par -W ignore 2>&1 | tee "$OUT/gpu_tests_grid.log" \
                 | grep -E "FAILED|ERROR|passed|failed"
             fi ;;
    pdl)     # the recorded step with programmatic dependent launch off / on, per GEMV prefetch depth (~3 min)
             step python -m bench.pdl_sweep --rows 1x128,8x512 --formats bf16,int8,int4 --prefetch 0,1,2,16 \
               --out "$OUT/pdl_sweep_${TAG}.json" ;;
    decode)  step python -m bench.decode --rows 1x128 --out "$OUT/decode_${TAG}.json" ;;
    decode-batch)  # transformers' static-cache compile recompiles per shape: the slowest peer, run last
             step python -m bench.decode --rows 8x512,32x512 --iters 2 --out "$OUT/decode_batch_${TAG}.json" ;;
    quant)   # the bf16 row again (the quantized rows' ratio in the same run), then each format against the recipe peer
             step python -m bench.decode --rows 1x128,8x512 --peers none --out "$OUT/decode_bf16_${TAG}.json"
             for q in int8 int4; do
               step python -m bench.decode --quant $q --rows 1x128,8x512 --peers stablelm-no-pdl,stablelm-torch-compile \
                 --out "$OUT/decode_${q}_${TAG}.json"
             done
             # the size target's layout: int4 with the lm_head and the embedding table quantized too
             step python -m bench.decode --quant int4 --quantize-head --quantize-embedding --rows 1x128 --peers none \
               --out "$OUT/decode_int4_head_embed_${TAG}.json" ;;
    train)   step python -m bench.report_train --out "$OUT/report_train_${TAG}.json" \
               --rows stablelm-lora-peft,stablelm-lora-peft-compile,stablelm-lora-peft-compile-budget,transformers-lora ;;
    train-ckpt-full)  # gradient checkpointing (eager and compiled) and full fine-tuning, each against transformers
             step python -m bench.report_train --out "$OUT/report_train_ckpt_full_${TAG}.json" \
               --rows stablelm-lora-peft-ckpt,stablelm-lora-peft-ckpt-compile,stablelm-full,transformers-lora-ckpt,transformers-full ;;
    train-mixed)  # full fine-tuning in bf16 with float32 master weights against transformers' autocast recipe
             step python -m bench.report_train --out "$OUT/report_train_mixed_${TAG}.json" \
               --rows stablelm-full-mixed,stablelm-full-mixed-compile,transformers-full-autocast ;;
    train-qlora)  # the bf16 LoRA row again: the QLoRA rows' base in the same run (and the fused-adapter layout)
             step python -m bench.report_train --steps 30 --out "$OUT/report_train_qlora_${TAG}.json" \
               --rows stablelm-lora-peft,stablelm-lora-fused,stablelm-qlora-int8,stablelm-qlora-int4,stablelm-qlora-nf4 ;;
    quant-gemv) step python -m bench.quant_gemv_peers --out "$OUT/quant_gemv_peers_${TAG}.json" ;;
    tp)      step python -m bench.tp_decode --out "$OUT/tp_decode_${TAG}.json" ;;
    prefill) step python -m bench.prefill --out "$OUT/prefill_${TAG}.json" ;;
    checkop) step python -m stablelm check-op rotary kernels.rotary:rotary_triton --device cuda --model --speed \
               --json "$OUT/check_op_rotary_${TAG}.json" ;;
    kernels) step python -m bench.kernels --out "$OUT/kernels_${TAG}.json" ;;
  esac
done
echo "=== done ($(date +%T))"
