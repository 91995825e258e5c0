#!/usr/bin/env bash
# On the 16-core device machine (one command of the device tool; the GPU is not used): build the
# C++ rollouts for its Python against a carried mujoco, then bench_alignment_control's walker_ant
# profile. mujoco, gymnasium and their missing dependencies come as cp312 wheels in .whl_ctl/
# (see the device tool's README). Results, the build log and the per-run records go to $OUT.
#   run: AIHF_FAST_COMMIT=<sha> bash benchmarks/run_device_control.sh   (carry .whl_ctl)
set -uo pipefail
OUT=${OUT:-benchmarks/results}
PROFILE=${PROFILE:-walker_ant}
SEEDS=${SEEDS:-}  # e.g. "3 4 5": other seeds than the profile's
TAG=${PROFILE}${SEEDS:+_s${SEEDS// /}}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_ctl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
t0=$(date +%s)
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
export PYTHONPATH=$PWD:/tmp/site
python3 -c "import aihf_fast._C, mujoco, gymnasium; print('mujoco', mujoco.__version__, 'gymnasium', gymnasium.__version__)" || exit 1
nproc; grep -m1 "model name" /proc/cpuinfo
timeout "${BENCH_TIMEOUT:-480}" python3 benchmarks/bench_alignment_control.py --profile "$PROFILE" --work /tmp/bac \
  ${SEEDS:+--seeds $SEEDS} --out "$OUT/bench_alignment_control_${TAG}.json" 2>&1 | grep -v "settotalmass\|^$"
echo "bench exit: ${PIPESTATUS[0]}"
tar czf "$OUT/records_${TAG}.tgz" -C /tmp/bac records 2>/dev/null
ls -la "$OUT"
