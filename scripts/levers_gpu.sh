#!/usr/bin/env bash
# Issue 20's levers (minillm/optim/levers.py), measured in ONE device call (about 6 minutes on one H100):
#   0. their CUDA tests (no host sync in a deferred step; a non-finite one skipped on the GPU; Muon's bf16 iteration);
#   1. tokens/s of each lever against the baseline (the defaults before: sync and ns are CUDA's defaults now), small and medium, same process, 2 interleaved rounds
#      (scripts/bench_train.py --ab, --timing total: the steps back to back, one synchronisation at the end);
#   2. correctness: `minillm train --config small` 200 steps on real text, seed 1337, --compile on, without and with
#      the levers; the final validation loss of each lever run within 0.5% of the baseline's.
# Run from the repository root:  bash scripts/levers_gpu.sh
# CORPUS: real text (default .gpu/es_small.txt, the first 3 MB of es_bible_rv1909: git ignores it, so carry it);
# without it, the repository's own docs are the corpus. .gpu/wheels/*.whl (ftfy) are installed when present.
# Files land in $OUT (the device call's output folder; /tmp/levers elsewhere).
set -u
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/levers}
mkdir -p "$OUT"
CORPUS=${CORPUS:-.gpu/es_small.txt}
if [ ! -f "$CORPUS" ]; then
  CORPUS=/tmp/levers_docs.txt
  for f in README.md docs/*.md; do cat "$f"; printf '\n<|doc|>\n'; done > "$CORPUS"
fi
ls .gpu/wheels/*.whl > /dev/null 2>&1 && pip install -q --no-index --no-deps .gpu/wheels/*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__)"
unset MINILLM_STEP_SYNC MINILLM_COMPILE_MODE MINILLM_MUON_NS

echo "== 0. the levers' CUDA tests: a deferred step never synchronises and skips on the GPU; Muon's fused bf16 iteration"
timeout 90 python -m pytest -q -p no:cacheprovider tests/test_trainstep.py tests/test_muon.py -k cuda 2>&1 | tail -8

echo "== 1. tokens/s per lever (ratio to the first variant, the host check and plain Newton-Schulz: the defaults before they were measured)"
timeout 300 python scripts/bench_train.py --config small --config medium --timing total --rounds 2 \
  --ab hostsync,matmulns --ab hostsync --ab matmulns --ab base --ab cudagraphs --json > "$OUT/ab.jsonl" 2> "$OUT/ab.err"
echo "rc=$?"; grep -v '^\s*$' "$OUT/ab.err" | tail -12
grep -h '"error"' "$OUT/ab.jsonl" | cut -c1-400

echo "== 2. correctness: 200 steps of small on $CORPUS, final validation loss against the baseline"
python -m minillm init-tokenizer -f "$CORPUS" --vocab-size 8000 -o /tmp/levers_tok.json > /dev/null
train() {  # train NAME [VAR=VALUE...]: one run with those levers
  local name=$1; shift
  env "$@" timeout 90 python -m minillm train -t /tmp/levers_tok.json -c "$CORPUS" -o "/tmp/levers_$name" --overwrite \
    --config small --max-steps 200 --eval-every 50 --compile on --epochs 0 --log-format json \
    > "$OUT/train_$name.out" 2> "$OUT/train_$name.err"
  echo "$name rc=$?"; cp "/tmp/levers_$name/history.json" "$OUT/history_$name.json" 2> /dev/null
}
train base MINILLM_STEP_SYNC=step MINILLM_MUON_NS=matmul
train sync_ns
train all MINILLM_COMPILE_MODE=reduce-overhead
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {}
for name in ("base", "sync_ns", "all"):
    p = out / f"history_{name}.json"
    runs[name] = [e["val_loss"] for e in json.loads(p.read_text())["evals"]] if p.exists() else None
    print(f"{name:<8} val_loss at each evaluation: {runs[name]}")
base = runs["base"]
for name in ("sync_ns", "all"):
    if base and runs[name] and len(runs[name]) == len(base):
        diff = abs(runs[name][-1] - base[-1]) / base[-1]
        print(f"{name:<8} final {runs[name][-1]:.4f} vs {base[-1]:.4f}: {100 * diff:.3f}% apart: "
              + ("PASS (<= 0.5%)" if diff <= 0.005 else "FAIL (> 0.5%)"))
    else:
        print(f"{name:<8} no comparable run (see train_{name}.err)")
PY
for name in base sync_ns all; do grep -h '"startup"\|"done"\|skipped\|Error\|error' "$OUT/train_$name.err" | cut -c1-300 | tail -3; done
