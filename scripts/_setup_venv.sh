# Sourced by quickstart.sh and test.sh: create .venv and install minillm into it (idempotent).
# Usage: EXTRAS=dev source scripts/_setup_venv.sh   (VENV=DIR for another environment, PYTHON=python3.X)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
CPU_INDEX=https://download.pytorch.org/whl/cpu
TORCH_PIN="torch==2.13.0"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV (first run only: about a minute with torch; README § Install)" >&2
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "[setup] installing torch (CUDA build, ~1 GB with its CUDA libraries: a few minutes)" >&2
    "$VPY" -m pip install -q "torch>=2.6"
  else
    # The CPU index first, with a short timeout so that a machine which cannot reach it loses seconds; then
    # the pinned version from pip's configured (default) index.
    echo "[setup] no GPU found: installing the CPU build of torch (a 192 MB wheel: about a minute, once)" >&2
    "$VPY" -m pip install -q --timeout 5 --retries 0 --index-url "$CPU_INDEX" "$TORCH_PIN" 2>/dev/null \
      || { echo "[setup] no torch from $CPU_INDEX (unreachable?): $TORCH_PIN from the default index" >&2
           "$VPY" -m pip install -q "$TORCH_PIN"; }
  fi
fi

# Whether minillm imports from this checkout and every dependency in pyproject.toml is installed.
minillm_ready() {
  "$VPY" - "$ROOT" >/dev/null 2>&1 <<'PY'
import importlib.metadata as md, pathlib, re, sys, tomllib
root = pathlib.Path(sys.argv[1])
import minillm
assert pathlib.Path(minillm.__file__).resolve().parent == (root / "minillm").resolve()
for req in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]:
    md.version(re.match(r"[A-Za-z0-9_.-]+", req)[0])
PY
}
if [ -n "${EXTRAS:-}" ] || ! minillm_ready; then
  SPEC="$ROOT"
  [ -n "${EXTRAS:-}" ] && SPEC="$ROOT[$EXTRAS]"
  echo "[setup] installing minillm${EXTRAS:+[$EXTRAS]} and its dependencies (seconds when they are installed)" >&2
  "$VPY" -m pip install -q -e "$SPEC" 2>&1 | grep -v -i "warning" >&2 || true
  "$VPY" -c "import minillm" || { echo "[setup] installing minillm failed" >&2; exit 1; }
fi
export PATH="$VENV/bin:$PATH"
