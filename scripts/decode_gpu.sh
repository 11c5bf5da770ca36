#!/usr/bin/env bash
# One device call for issue 22 (decoding), on a CUDA GPU: the CUDA decoding tests; the Triton kernels' block sizes
# tried (scripts/tune_decode.py) and the best kept for the rest of the call (MINILLM_DECODE_BLOCKS); a kernel
# profile of the K-step graph; bench_generate's rows with the Triton kernels (graphKf, generate's default) against the
# eager fused step (graphKe), and with FULL=1 the whole bench (the transformers row, the held-out loss check, the
# first streamed token). Prepare with `bash scripts/prepare_device_call.sh`, carry [".gpu"]; results under $OUT.
#   TESTS=0, TUNE=0, PROFILE=0, SAMPLER=0, BENCH=0 skip those parts; ROWS="..." (bench_generate --only, without FULL);
#   SAMPLER_BLOCKS, SAMPLER_WARPS: the sampler's trials (the fastest kept for the rest of the call);
#   BASE=dir: the same rows, graphKf, from another tree too (`git archive REV | tar -x -C dir`), in the same call.
set -u
OUT=${OUT:-/tmp/decode_gpu}
mkdir -p "$OUT"
python -m pip install -q --no-index --no-deps .gpu/wheels/*.whl 2> /dev/null
export PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${TESTS:-1}" = 1 ]; then
    python -m pytest -q -p no:cacheprovider tests/test_triton_decode.py tests/test_generation_static.py \
        tests/test_generation_decoder.py tests/test_fused_decode.py tests/test_generation_sampling.py tests/test_generation.py \
        -k "not background and not compiled" 2>&1 | tail -4 | tee "$OUT/tests.txt"
fi
if [ "${TUNE:-1}" = 1 ]; then
    python scripts/tune_decode.py --configs large,small --batches 1,32 --chunks 16,32 --variants "${VARIANTS:-base,first,n64k256,n32k512,n16k512,h256k256,slots128}" > "$OUT/tune.jsonl" 2> "$OUT/tune.err"
    tail -2 "$OUT/tune.err"
    # the variant and chunk with the best geometric mean of tokens/s over the rows, relative to base at chunk 16
    BEST=$(python - "$OUT/tune.jsonl" <<'PY'
import json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
base = {(r["config"], r["batch"]): r["tokens_per_s"] for r in rows if r["variant"] == "base" and r["chunk"] == 16}
score = {}
for r in rows:
    score.setdefault((r["variant"], r["chunk"]), []).append(math.log(r["tokens_per_s"] / base[(r["config"], r["batch"])]))
for r in rows:
    print(r["config"], r["batch"], r["variant"], r["chunk"], r["tokens_per_s"], file=sys.stderr)
best = max(score, key=lambda v: sum(score[v]) / len(score[v]))
print(f"best {best}: {math.exp(sum(score[best]) / len(score[best])):.3f}x base", file=sys.stderr)
blocks = next(r["blocks"] for r in rows if (r["variant"], r["chunk"]) == best)
print(best[1], json.dumps(blocks, separators=(",", ":")))
PY
)
    CHUNK=${BEST%% *}
    export MINILLM_DECODE_BLOCKS=${BEST#* }
    echo "MINILLM_DECODE_BLOCKS=$MINILLM_DECODE_BLOCKS CHUNK=$CHUNK" | tee "$OUT/blocks.txt"
fi
if [ "${PROFILE:-1}" = 1 ]; then
    for c in ${PROFILE_CONFIGS:-large}; do
        python scripts/profile_decode.py --config "$c" --dtypes bf16 --modes graph --top 30 > "$OUT/profile_$c.txt" 2>&1
        grep -E "tokens/s|per token" "$OUT/profile_$c.txt" | sed "s/^/$c: /"
        grep -E "^ +(attend|combine|add_linear|norm_linear|qkv|candidates|pick) " "$OUT/profile_$c.txt" | cut -c1-60,150-200
    done
fi
if [ "${SAMPLER:-1}" = 1 ]; then  # the sampler's vocabulary block and warps: the fastest at batch 1 kept for the call
    python scripts/bench_sampler.py --batches 1,32 --blocks "${SAMPLER_BLOCKS:-1024,2048,4096}" \
        --warps "${SAMPLER_WARPS:-4}" | tee "$OUT/bench_sampler.jsonl"
    export MINILLM_DECODE_BLOCKS=$(python - "$OUT/bench_sampler.jsonl" "${MINILLM_DECODE_BLOCKS:-}" <<'PY'
import json, re, sys
rows = {r["batch"]: r for r in map(json.loads, open(sys.argv[1]))}
times = {k[:-3]: v for k, v in rows[1].items() if k.endswith("_us") and k.startswith("triton")}
ok = [k for k in times if all(r.get(k + "_same_tokens", False) for r in rows.values())]
best = min(ok, key=lambda k: (times[k], rows.get(32, rows[1])[k + "_us"]))
block, warps = map(int, re.match(r"triton_(\d+)_w(\d+)", best).groups())
print(json.dumps(json.loads(sys.argv[2] or "{}") | {"vocab": block, "sample_warps": warps}, separators=(",", ":")))
PY
)
    echo "MINILLM_DECODE_BLOCKS=$MINILLM_DECODE_BLOCKS" | tee -a "$OUT/blocks.txt"
fi
if [ -n "${BASE:-}" ]; then  # the same rows from another tree (the code before, unpacked by `git archive`)
    (cd "$BASE" && PYTHONPATH=. python scripts/bench_generate.py --no-train --no-hf --dtypes bf16 \
        --sampling default,greedy --configs large,small --decoders graphKf --repeats 3 --batch 32 \
        --only "${ROWS:-large default batch 1,large greedy batch 1,large default batch 32,small default batch 1,small greedy batch 1}" \
        > "$OUT/bench_base.jsonl" 2> "$OUT/bench_base.err")
    grep -E "tok/s" "$OUT/bench_base.err" | sed 's/^/base: /'
fi
if [ "${BENCH:-1}" = 0 ]; then
    exit 0
elif [ "${FULL:-0}" = 1 ]; then  # ROWS here: only those decode rows; NOHF=1: no transformers rows
    python scripts/bench_generate.py --dtypes bf16 --decoders graphKe,graphKf --repeats 3 --batch 32 --chunk "${CHUNK:-16}" \
        --configs large,small --workdir /tmp/bench-generate ${ROWS:+--only "$ROWS"} ${NOHF:+--no-hf} \
        > "$OUT/bench_generate.jsonl" 2> "$OUT/bench_generate.err"
else
    ROWS=${ROWS:-"large default batch 1,large greedy batch 1,large default batch 32,small default batch 1,small greedy batch 1"}
    python scripts/bench_generate.py --no-train --no-hf --dtypes bf16 --sampling default,greedy \
        --configs large,small --decoders graphKe,graphKf --repeats 3 --batch 32 --only "$ROWS" --chunk "${CHUNK:-16}" \
        > "$OUT/bench_generate.jsonl" 2> "$OUT/bench_generate.err"
fi
grep -E "tok/s|held-out|first streamed|Error|error" "$OUT/bench_generate.err" | tail -40
