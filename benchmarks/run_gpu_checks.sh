#!/usr/bin/env bash
# On a CUDA machine: the kernel tests on the GPU (real Triton, not the interpreter), then
# bench_loss.py, then (when TRL is installed) bench_trl.py's GPU preset, and with TRAIN_MAX_BATCH=1
# bench_train.py's (tokens/s and the largest micro-batch per loss path). Logs and results go to $OUT
# (default benchmarks/results); each step has its own timeout (*_TIMEOUT). Optional wheels for
# the baselines (liger-kernel, cut-cross-entropy) are installed from .whl/ when present.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_info.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu_info.txt"
# fixed kernel tiles in tests: autotuning every tiny test shape would only cost compile time
AIHF_FAST_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider \
  tests/ops/test_logprobs.py tests/ops/test_aihf_loss.py tests/ops/test_grad_in_forward.py tests/ops/test_large_shapes.py tests/ops/test_bad_input.py 2>&1 | tee "$OUT/gpu_tests.log"
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.log"
timeout "${BENCH_TIMEOUT:-340}" python3 benchmarks/bench_loss.py --time-budget "${BENCH_BUDGET:-300}" \
  --out "$OUT/bench_loss_${GPU_TAG:-gpu}.json" 2>&1 | tee "$OUT/bench_loss_${GPU_TAG:-gpu}.log"
echo "bench exit: ${PIPESTATUS[0]}"
if python3 -c "import trl" 2>/dev/null; then
  timeout "${TRL_TIMEOUT:-300}" python3 benchmarks/bench_trl.py --preset gpu-1b --rounds 1 \
    --out "$OUT/bench_trl_${GPU_TAG:-gpu}.json" 2>&1 | tee "$OUT/bench_trl_${GPU_TAG:-gpu}.log"
  echo "bench_trl exit: ${PIPESTATUS[0]}"
fi
if [ "${TRAIN_MAX_BATCH:-0}" = 1 ] && python3 -c "import transformers" 2>/dev/null; then
  # end to end: tokens/s and the largest micro-batch of a 1B model's training step, per loss path
  timeout "${TRAIN_TIMEOUT:-540}" python3 benchmarks/bench_train.py --preset gpu-1b --rounds 1 --max-batch \
    --max-batch-limit "${MAX_BATCH_LIMIT:-32}" --out "$OUT/bench_train_${GPU_TAG:-gpu}.json" 2>&1 \
    | tee "$OUT/bench_train_${GPU_TAG:-gpu}.log"
  echo "bench_train exit: ${PIPESTATUS[0]}"
fi
