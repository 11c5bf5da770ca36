#!/usr/bin/env bash
# One device call for issue 22 (decoding): the CUDA decoding tests, then bench_generate's rows with the Triton decode
# kernels (graphKf, generate's default) against the eager fused step (graphKe), then a kernel profile of the K-step
# graph. Prepare with `bash scripts/prepare_device_call.sh`, carry [".gpu"]; results under $OUT (or /tmp/decode_gpu).
#   ROWS="..." (bench_generate --only), CONFIGS (default large,small), PROFILE=0 to skip the profile.
set -u
OUT=${OUT:-/tmp/decode_gpu}
mkdir -p "$OUT"
python -m pip install -q --no-index --no-deps .gpu/wheels/*.whl 2> /dev/null
export PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python -m pytest -q -p no:cacheprovider tests/test_triton_decode.py tests/test_generation_static.py \
    tests/test_generation_decoder.py tests/test_fused_decode.py -k "not background" 2>&1 | tail -15 | tee "$OUT/tests.txt"
ROWS=${ROWS:-"large default batch 1,large greedy batch 1,large default batch 32,small default batch 1,small greedy batch 1"}
python scripts/bench_generate.py --no-train --no-hf --dtypes bf16 --sampling default,greedy \
    --configs "${CONFIGS:-large,small}" --decoders graphKe,graphKf --repeats 3 --batch 32 --only "$ROWS" \
    > "$OUT/bench_generate.jsonl" 2> "$OUT/bench_generate.err"
grep -E "tok/s|Error|error" "$OUT/bench_generate.err" | tail -30
if [ "${PROFILE:-1}" = 1 ]; then
    python scripts/profile_decode.py --config large --dtypes bf16 --modes graph --top 30 > "$OUT/profile_large.txt" 2>&1
    grep -E "tokens/s|per token" "$OUT/profile_large.txt"
fi
if [ "${TUNE:-0}" = 1 ]; then
    python scripts/tune_decode.py --configs "${CONFIGS:-large,small}" --batches 1,32 > "$OUT/tune.jsonl" 2> "$OUT/tune.err"
    cat "$OUT/tune.jsonl" | python -c "import sys, json; [print(r['config'], r['batch'], r['variant'], r['tokens_per_s']) for r in map(json.loads, sys.stdin)]"
    tail -3 "$OUT/tune.err"
fi
