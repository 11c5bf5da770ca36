#!/usr/bin/env bash
# Issue 20's open levers (minillm/optim/levers.py), measured in ONE device call (about 7 minutes on one H100):
#   0. the levers' CUDA tests;
#   1. tokens/s of each lever against the defaults, CONFIGS (default small medium large), same process, ROUNDS
#      interleaved rounds (scripts/bench_train.py --ab, --timing total: the steps back to back, one sync at the end);
#   2. medium's slowest kernels (--profile) and the Triton source of its reductions (TORCH_LOGS=output_code) in
#      $OUT/medium_reductions.py, to read why a kernel is slow;
#   3. correctness: `minillm train --config small` 200 steps on real text, seed 1337, --compile on, with the defaults
#      and with each lever; the final validation loss of each within 0.5% of the defaults'.
# Run from the repository root:  bash scripts/levers_gpu.sh
# VARIANTS: bench_train.py --ab names (default "plainloss norm_weight=false"; base always runs; a key=value variant is
# a model change, timed in step 1 only: its quality is bench_quality.py's to judge, not step 3's); CONFIGS; ROUNDS (2).
# CORPUS: real text (default .gpu/es_small.txt, the first 3 MB of es_bible_rv1909: git ignores it, so carry it);
# without it, the repository's own docs are the corpus. .gpu/wheels/*.whl are installed when present: ftfy and
# wcwidth only (PyPI's typer now needs pydantic, which the GPU machine lacks: its own typer works, keep it).
# Files land in $OUT (the device call's output folder; /tmp/levers elsewhere).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/levers}
mkdir -p "$OUT"
VARIANTS=${VARIANTS:-"plainloss norm_weight=false"}
CONFIGS=${CONFIGS:-"small medium large"}
ROUNDS=${ROUNDS:-2}
CORPUS=${CORPUS:-.gpu/es_small.txt}
if [ ! -f "$CORPUS" ]; then
  CORPUS=/tmp/levers_docs.txt
  for f in README.md docs/*.md; do cat "$f"; printf '\n<|doc|>\n'; done > "$CORPUS"
fi
ls .gpu/wheels/*.whl > /dev/null 2>&1 && pip install -q --no-index --no-deps .gpu/wheels/*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__)"
unset MINILLM_STEP_SYNC MINILLM_COMPILE_MODE MINILLM_MUON_NS MINILLM_NORM MINILLM_PROJ MINILLM_TUNE MINILLM_LOSS MINILLM_REDUCE
export TORCHINDUCTOR_CACHE_DIR=/tmp/levers_ic TRITON_CACHE_DIR=/tmp/levers_tc

echo "== 0. the levers' CUDA tests"
timeout 90 python -m pytest -q -p no:cacheprovider tests/test_trainstep.py tests/test_muon.py tests/test_triton_loss.py -k "cuda or triton" 2>&1 | tail -3

echo "== 1. tokens/s per lever (ratio to base: the CUDA defaults)"
ab=(--ab base); for v in $VARIANTS; do ab+=(--ab "$v"); done
cfg=(); for c in $CONFIGS; do cfg+=(--config "$c"); done
timeout 330 python scripts/bench_train.py "${cfg[@]}" --timing total --rounds "$ROUNDS" "${ab[@]}" --json \
  > "$OUT/ab.jsonl" 2> "$OUT/ab.err"
echo "rc=$?"; grep -v '^\s*$' "$OUT/ab.err" | grep -v Warning | tail -$((4 + 4 * $(echo $CONFIGS $VARIANTS | wc -w)))
grep -h '"error"' "$OUT/ab.jsonl" | cut -c1-400

echo "== 2. medium's slowest kernels and its reductions' source"
TORCH_LOGS=output_code TORCHINDUCTOR_CACHE_DIR=/tmp/levers_ic2 TRITON_CACHE_DIR=/tmp/levers_tc2 timeout 120 \
  python scripts/bench_train.py --config medium --timing total --steps 20 --profile 10 --json \
  > "$OUT/profile.out" 2> "$OUT/output_code.log"
grep -v '^{' "$OUT/profile.out" | head -12
python - "$OUT" <<'PY'
import re, sys
from pathlib import Path
out = Path(sys.argv[1])
text = (out / "output_code.log").read_text(errors="replace")
# each generated reduction kernel: from its @triton.jit decorator (with its heuristics) to the next blank line pair
kernels = re.findall(r"(@triton_heuristics\.\w+\(.*?\n@triton\.jit\ndef (triton_(?:per|red)_fused\w*)\(.*?)(?=\n\n\n)", text, re.S)
seen, keep = set(), []
for src, name in kernels:
    if name not in seen and ("rsqrt" in name or "pow" in name or "sum" in name):
        seen.add(name)
        keep.append(src)
(out / "medium_reductions.py").write_text("\n\n\n".join(keep))
print(f"{len(keep)} norm/reduction kernels written to medium_reductions.py ({len(kernels)} reductions in all)")
PY
rm -f "$OUT/output_code.log"

echo "== 3. correctness: 200 steps of small on $CORPUS, final validation loss against the defaults"
python -m minillm init-tokenizer -f "$CORPUS" --vocab-size 8000 -o /tmp/levers_tok.json > /dev/null
train() {  # train NAME [VAR=VALUE...]: one run with those levers, its own compile caches
  local name=$1; shift
  env "$@" TORCHINDUCTOR_CACHE_DIR="/tmp/levers_ic_$name" TRITON_CACHE_DIR="/tmp/levers_tc_$name" timeout 150 \
    python -m minillm train -t /tmp/levers_tok.json -c "$CORPUS" -o "/tmp/levers_$name" --overwrite --seed 1337 \
    --config small --max-steps 200 --eval-every 50 --compile on --epochs 0 --log-format json \
    > "$OUT/train_$name.out" 2> "$OUT/train_$name.err"
  echo "$name rc=$?"; cp "/tmp/levers_$name/history.json" "$OUT/history_$name.json" 2> /dev/null
}
lever_env() {  # the VAR=VALUE of a bench_train --ab name
  python -c "import sys; sys.path.insert(0, 'scripts'); from bench_train import LEVERS; v, x = LEVERS['$1']; print(f'{v}={x}')"
}
LEVER_VARIANTS=$(for v in $VARIANTS; do case $v in *=*) ;; *) echo "$v";; esac; done)
train base &
for v in $LEVER_VARIANTS; do sleep 2; train "$v" "$(lever_env "$v")" & done
wait
python - "$OUT" base $LEVER_VARIANTS <<'PY'
import json, sys
from pathlib import Path
out, names = Path(sys.argv[1]), sys.argv[2:]
runs = {}
for name in names:
    p = out / f"history_{name}.json"
    runs[name] = [e["val_loss"] for e in json.loads(p.read_text())["evals"]] if p.exists() else None
    print(f"{name:<10} val_loss at each evaluation: {runs[name]}")
base = runs["base"]
for name in names[1:]:
    if base and runs[name] and len(runs[name]) == len(base):
        diff = abs(runs[name][-1] - base[-1]) / base[-1]
        print(f"{name:<10} final {runs[name][-1]:.4f} vs {base[-1]:.4f}: {100 * diff:.3f}% apart: "
              + ("PASS (<= 0.5%)" if diff <= 0.005 else "FAIL (> 0.5%)"))
    else:
        print(f"{name:<10} no comparable run (see train_{name}.err)")
PY
