#!/usr/bin/env bash
# Every GPU check of the project in one unattended call on a lent CUDA machine, sized to end in
# about six minutes: the kernel and encoder tests on the GPU, the Triton self-check that
# backend="auto" runs, the training step against the reference-style step, whether bf16
# training collapses (as it does on the CPU), and the per-layer and whole-encoder benchmark. Logs and the benchmark's JSON go to $OUT (default /tmp/gpu_out);
# a short summary is printed last.
#
#     OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh
#
# Pure-Python dependencies that the machine lacks (monai, nibabel) may be carried as wheels in
# .whl/ (benchmarks/RESULTS.md, "Triton kernels (GPU)", says how).
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
    || { echo "install failed"; tail -20 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv \
    | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/device.txt"

echo "== 1. kernel, layer and encoder tests on the GPU"
timeout 170 python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors \
    tests/triton tests/test_loc_cond_conv.py tests/test_encoder.py tests/test_precision.py \
    tests/test_pretrain_bank_losses.py >"$OUT/pytest.log" 2>&1
echo "pytest exit $?"; tail -4 "$OUT/pytest.log"

echo "== 2. the self-check of backend=\"auto\""
timeout 60 python3 - <<'EOF' 2>&1 | tee "$OUT/self_check.log"
import time, torch
from drasclr.nn.triton_check import triton_self_check
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    start = time.perf_counter()
    reason = triton_self_check(torch.device("cuda"), dtype)
    print(f"self-check {dtype}: {'passed' if reason is None else reason} "
          f"({time.perf_counter() - start:.1f} s)")
EOF

echo "== 3. training step, ours against the reference-style step"
timeout 90 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_train.py --benchmark-only -s \
    --benchmark-json="$OUT/bench_train.json" >"$OUT/bench_train.log" 2>&1
echo "bench_train exit $?"; grep -E "patches/s|passed|failed|Error" "$OUT/bench_train.log" | tail -5

echo "== 4. does bf16 training collapse here as on the CPU? (benchmarks/bf16_training_check.py)"
timeout 60 python3 benchmarks/bf16_training_check.py --device cuda --steps 8 --runs 3 \
    >"$OUT/bf16_training_check.log" 2>&1
echo "bf16 check exit $?"; tail -7 "$OUT/bf16_training_check.log"

echo "== 5. layers and whole encoder (budget 130 s of measurements)"
timeout 200 python3 benchmarks/gpu_encoder_benchmark.py "$OUT/gpu_encoder_benchmark.json" \
    --budget-s 130 >"$OUT/gpu_encoder_benchmark.log" 2>&1
echo "encoder benchmark exit $?"; tail -60 "$OUT/gpu_encoder_benchmark.log"
