#!/usr/bin/env bash
# The whole minillm pipeline on the sample corpus shipped in the package (or on your own text):
#   scripts/quickstart.sh [INPUT ...]        (RUN=DIR for another output folder, MAX_TIME=20m to train longer)
# prepare -> analyze -> init-tokenizer -> train (tiny preset, CPU-friendly) -> generate -> evaluate,
# all into runs/quickstart/. It is also an example of chaining the stages in a shell script.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup_venv.sh

RUN="${RUN:-runs/quickstart}"
mkdir -p "$RUN"
if [ "$#" -gt 0 ]; then
  INPUTS=("$@")
else
  INPUTS=("$("$VPY" -c 'import minillm, pathlib; print(pathlib.Path(minillm.__file__).parent / "data" / "sample_es.txt")')")
fi
INPUT_ARGS=()
for f in "${INPUTS[@]}"; do INPUT_ARGS+=(--input "$f"); done
# Whether a given file (not a directory, not .jsonl) holds no <|doc|> line: then it would be one document.
needs_split() {
  local f
  for f in "$@"; do
    case "$f" in *.jsonl | *.jsonl.gz) continue ;; esac
    if [ -f "$f" ] && ! zgrep -qxF '<|doc|>' "$f"; then return 0; fi
  done
  return 1
}
count_documents() { "$VPY" -c 'import sys; from minillm.corpus.read import iter_documents as d; print(sum(1 for _ in d(sys.argv[1])))' "$1"; }

echo "== 1/6 prepare-corpus" >&2
# Documents end at <|doc|> lines; a file without any (a book, notes, a scraped site) is split at blank lines.
SPLIT=()
if needs_split "${INPUTS[@]}"; then
  echo "[quickstart] no <|doc|> line in an input file: splitting at blank lines into documents (--split-on-blank-lines)" >&2
  SPLIT=(--split-on-blank-lines)
fi
minillm prepare-corpus "${INPUT_ARGS[@]}" ${SPLIT[@]+"${SPLIT[@]}"} --output "$RUN/corpus.txt"
N_DOCS=$(count_documents "$RUN/corpus.txt")
if [ "$N_DOCS" -lt 3 ] && [ "${#SPLIT[@]}" -eq 0 ]; then
  echo "[quickstart] $N_DOCS document(s): splitting the input at blank lines too (--split-on-blank-lines)" >&2
  SPLIT=(--split-on-blank-lines)
  minillm prepare-corpus "${INPUT_ARGS[@]}" ${SPLIT[@]+"${SPLIT[@]}"} --output "$RUN/corpus.txt"
  N_DOCS=$(count_documents "$RUN/corpus.txt")
fi
if [ "$N_DOCS" -lt 3 ]; then
  echo "[quickstart] error: the input holds $N_DOCS document(s); the quickstart needs at least 3 (one to hold out," \
       "two to train and validate on): put a blank line or a <|doc|> line between documents" >&2
  exit 1
fi

# Hold out the last 5% of the documents (at least one): the model never trains on them, evaluate scores them.
"$VPY" - "$RUN/corpus.txt" "$RUN/train.txt" "$RUN/heldout.txt" <<'PY'
import sys
from minillm.corpus.read import DOC_JOIN, iter_documents
docs = list(iter_documents(sys.argv[1]))
k = max(1, len(docs) // 20)
for path, part in ((sys.argv[2], docs[:-k]), (sys.argv[3], docs[-k:])):
    with open(path, "w", encoding="utf-8") as f:
        f.write(DOC_JOIN.join(part) + "\n")
print(f"[quickstart] {len(docs) - k:,} documents to train on, {k:,} held out", file=sys.stderr)
PY

echo "== 2/6 analyze-corpus" >&2
minillm analyze-corpus --corpus "$RUN/train.txt" --json > "$RUN/analysis.json"
# Follow its advice (vocabulary, epochs, block size, stride) with the tiny preset, which trains on a CPU.
read -r VOCAB EPOCHS BLOCK STRIDE < <("$VPY" - "$RUN/analysis.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["recommendations"]
print(r["vocab_size"], r["epochs"], r["block_size"], r["stride"])
for key in ("vocab_size", "epochs", "block_size", "stride"):
    print(f"[quickstart] {key} {r[key]:g}: {r['reasons'][key]}", file=sys.stderr)
PY
)

echo "== 3/6 init-tokenizer" >&2
minillm init-tokenizer --files "$RUN/train.txt" --vocab-size "$VOCAB" --out "$RUN/tokenizer.json"

echo "== 4/6 train (tiny preset, ${EPOCHS} epochs, at most ${MAX_TIME:-5m})" >&2
minillm train --tokenizer "$RUN/tokenizer.json" --corpus "$RUN/train.txt" --outdir "$RUN/model" \
  --config tiny --epochs "$EPOCHS" --max-steps 0 --block-size "$BLOCK" --stride "$STRIDE" \
  --max-time "${MAX_TIME:-5m}" --overwrite --device auto

echo "== 5/6 generate" >&2
TEXT=$(minillm generate --ckpt "$RUN/model/ckpt_best.pt" --prompt "En el principio" --max-tokens 60 --seed 0)

echo "== 6/6 evaluate (held-out documents)" >&2
RESULT=$(minillm evaluate --ckpt "$RUN/model/ckpt_best.pt" --test-file "$RUN/heldout.txt")

echo
echo "Generated text:"
echo "  $TEXT"
echo "Held-out evaluation:"
echo "  $RESULT"
echo "Run directory: $RUN/model (curves.png, history.json, checkpoints)"
