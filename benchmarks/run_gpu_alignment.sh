#!/usr/bin/env bash
# On a CUDA machine (one command of the device tool): bench_train's gpu-1b preset (the trainer's
# fused path vs full-logit log-probs), then bench_alignment_llm's full profile for as many seeds as
# the time allows (runs are cached, so the second call continues the first). Results and a tarball
# of the per-run records go to $OUT. DeepSpeed and its missing dependencies come as wheels in
# .whl_llm/ (see the device tool's README).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl_llm/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_llm/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
TAG=${GPU_TAG:-gpu}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_info.txt"
nproc | tee -a "$OUT/gpu_info.txt"
timeout "${TRAIN_TIMEOUT:-150}" python3 benchmarks/bench_train.py --preset gpu-1b --rounds 1 \
  --out "$OUT/bench_train_${TAG}_gpu-1b.json" 2>&1 | tail -n 30
echo "bench_train exit: ${PIPESTATUS[0]}"
W=/tmp/bench_alignment_llm_full
timeout "${ALIGN1_TIMEOUT:-200}" python3 benchmarks/bench_alignment_llm.py --profile full --seeds 1 \
  --workers "${WORKERS:-12}" --work $W --out "$OUT/bench_alignment_llm_full_${TAG}.json" > "$OUT/align.log" 2>&1
echo "align (1 seed) exit: $?"
timeout "${ALIGN2_TIMEOUT:-180}" python3 benchmarks/bench_alignment_llm.py --profile full --seeds "${SEEDS:-2}" \
  --workers "${WORKERS:-12}" --work $W --out "$OUT/bench_alignment_llm_full_${TAG}.json" >> "$OUT/align.log" 2>&1
echo "align (${SEEDS:-2} seeds) exit: $?"
grep -v "Warning\|Loading weights\|Writing model\|real_accelerator" "$OUT/align.log" | tail -n 60
tar czf "$OUT/align_records.tgz" -C $W records 2>/dev/null
ls -la "$OUT"
