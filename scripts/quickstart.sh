#!/usr/bin/env bash
# The whole minillm pipeline on the sample corpus shipped in the package (or on your own text):
#   scripts/quickstart.sh [INPUT.txt ...]
# prepare -> analyze -> init-tokenizer -> train (tiny preset, CPU-friendly) -> generate -> evaluate,
# all into runs/quickstart/. It is also an example of chaining the stages in a shell script.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_setup_venv.sh

RUN=runs/quickstart
mkdir -p "$RUN"
if [ "$#" -gt 0 ]; then
  INPUTS=("$@")
else
  INPUTS=("$(.venv/bin/python -c 'import minillm, pathlib; print(pathlib.Path(minillm.__file__).parent / "data" / "sample_es.txt")')")
fi
INPUT_ARGS=()
for f in "${INPUTS[@]}"; do INPUT_ARGS+=(--input "$f"); done

echo "== 1/6 prepare-corpus" >&2
minillm prepare-corpus "${INPUT_ARGS[@]}" --output "$RUN/corpus.txt"

# Hold out the last 10 documents: the model never trains on them, evaluate scores them.
.venv/bin/python - "$RUN/corpus.txt" "$RUN/train.txt" "$RUN/heldout.txt" <<'PY'
import sys
from minillm.corpus.read import iter_documents
docs = list(iter_documents(sys.argv[1]))
k = max(1, min(10, len(docs) // 10))
for path, part in ((sys.argv[2], docs[:-k]), (sys.argv[3], docs[-k:])):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n<|doc|>\n".join(part) + "\n")
PY

echo "== 2/6 analyze-corpus" >&2
minillm analyze-corpus --corpus "$RUN/train.txt"

echo "== 3/6 init-tokenizer" >&2
minillm init-tokenizer --files "$RUN/train.txt" --vocab-size 4000 --out "$RUN/tokenizer.json"

echo "== 4/6 train (tiny preset)" >&2
minillm train --tokenizer "$RUN/tokenizer.json" --corpus "$RUN/train.txt" --outdir "$RUN/model" \
  --config tiny --overwrite --device auto

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
