#!/usr/bin/env bash
# The GPU checks of issue 4 in one command (a lent GPU machine's time is short: one call does all):
#   1. the machine: nvidia-smi, JAX and PyTorch versions and devices;
#   2. manual BPTT == autodiff on the GPU: the gradient tests (every cell, layers, directions,
#      lengths; float64 and float32) at full float32 matmul precision, since TF32 (XLA's default
#      on the GPU) rounds each product to 10 mantissa bits and differs between any two orderings;
#   3. the native CPU loops (jaxrnn/kernels) on that machine's many-core host: tests/test_kernels.py
#      with JAX_PLATFORMS=cpu, run beside step 2 (a loop there splits over up to 16 threads, where
#      the project's own machine has 2), built with the host's C++ compiler against its jaxlib;
#   4. the benchmark with --device cuda: every JAX implementation on the GPU against PyTorch's
#      cuDNN nn.RNN / nn.LSTM / nn.GRU, each framework at its default precision.
#
# Usage, from the repository root on the GPU machine (results land in $OUT, default runs/gpu):
#   bash experiments/bench/gpu_run.sh
# Environment: PYTHON (python3), TEST_TIMEOUT (s, 100), BENCH_TIMEOUT (s, 380),
# BENCH_ARGS (extra arguments for bench.py). Wheels in .whl/ (e.g. dm-haiku, which that machine
# lacks) are installed into /tmp/site first; .whl/ is git-ignored, so the device tool copies it
# only when its `carry` names it.
set -u
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the card
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  command -v c++ g++ cc; nproc
  $PY - <<'EOF'
import jax, torch
print("jax", jax.__version__, jax.devices())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
      torch.backends.cudnn.version(), torch.cuda.get_device_name(0))
EOF
} 2>&1 | tee "$OUT/env.txt"

echo "== native CPU loop tests on the host (JAX_PLATFORMS=cpu), in the background"
(JAX_PLATFORMS=cpu timeout "${TEST_TIMEOUT:-100}" $PY -m pytest -q -p no:cacheprovider \
  tests/test_kernels.py > "$OUT/tests_kernels_cpu.txt" 2>&1
 echo "pytest exit status $? (124: stopped at TEST_TIMEOUT)" >> "$OUT/tests_kernels_cpu.txt") &
KERNEL_TESTS=$!

echo "== gradient tests on the GPU (JAX_DEFAULT_MATMUL_PRECISION=highest)"
# Four pytest workers (that machine has 16 cores; on-demand GPU memory lets them share the card).
JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TEST_TIMEOUT:-100}" \
  $PY -m pytest -v -n 4 -p no:cacheprovider tests/test_rnn.py tests/test_cells.py \
  tests/test_mingru.py > "$OUT/tests.txt" 2>&1
echo "pytest exit status $? (124: stopped at TEST_TIMEOUT)" >> "$OUT/tests.txt"
echo "passed: $(grep -c ' PASSED' "$OUT/tests.txt"), failed: $(grep -c ' FAILED' "$OUT/tests.txt")"
grep -E " FAILED|^E " "$OUT/tests.txt" | head -n 20
tail -n 3 "$OUT/tests.txt"

wait $KERNEL_TESTS
echo "== native CPU loop tests:"; tail -n 4 "$OUT/tests_kernels_cpu.txt"

echo "== benchmark, --device cuda"
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-380}" $PY experiments/bench/bench.py --device cuda --repeats 5 \
  --target-s 0.1 --json "$OUT/gpu.json" --markdown "$OUT/gpu.md" ${BENCH_ARGS:-} \
  > "$OUT/bench.log" 2>&1
echo "bench exit status $? (124: stopped at BENCH_TIMEOUT; gpu.json keeps the finished cases)"
grep -E "^(device|JAX float32|[a-z]+/[a-z]+ \(|  jaxrnn .* ratio)" "$OUT/bench.log"
tail -n 5 "$OUT/bench.log"
