#!/usr/bin/env bash
# Prepare the ignored folders a GPU device call carries (run on the development machine, from the repository root):
#   .gpu/wheels/      ftfy and wcwidth, which the GPU machine lacks (NOT typer: PyPI's typer needs pydantic, which the
#                     GPU machine lacks too, and its own typer works; installing ours over it breaks `minillm ...`)
#   .gpu/es_small.txt the first 3 MB of ../shared/corpora/es_bible_rv1909.txt (real text for the correctness runs)
#   .anchors/         ../shared/anchors (nanoGPT and the comparison scripts) with en_techdocs.txt.gz for compare_quality.sh
# Then carry [".gpu", ".anchors"], and on the GPU machine first:
#   python -m pip install -q --no-index --no-deps .gpu/wheels/*.whl; export PYTHONPATH=.
# e.g. `bash scripts/levers_gpu.sh`, `SHAPES="small medium" WHEELS=.gpu/wheels bash .anchors/compare_train.sh`.
set -eu
SHARED=${SHARED:-../shared}
mkdir -p .gpu/wheels
python3 -m pip download -q --no-deps --dest .gpu/wheels ftfy wcwidth
[ -f .gpu/es_small.txt ] || head -c 3000000 "$SHARED/corpora/es_bible_rv1909.txt" > .gpu/es_small.txt
grep -qx '.anchors/' .git/info/exclude 2> /dev/null || { mkdir -p .git/info; echo '.anchors/' >> .git/info/exclude; }
rm -rf .anchors && cp -r "$SHARED/anchors" .anchors && chmod -R u+w .anchors
gzip -c "$SHARED/corpora/en_techdocs.txt" > .anchors/en_techdocs.txt.gz
ls .gpu/wheels; du -sh .gpu .anchors
