# Sourced by quickstart.sh and test.sh: create .venv and install minillm into it (idempotent).
# Usage: EXTRAS=dev source scripts/_setup_venv.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  # The CPU build of torch where there is no GPU (small and quick); the default CUDA build otherwise.
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "[setup] installing torch (CUDA build)" >&2
    "$VPY" -m pip install -q "torch>=2.6"
  else
    echo "[setup] no GPU found: installing the CPU build of torch" >&2
    "$VPY" -m pip install -q "torch==2.13.0" 2>/dev/null \
      || "$VPY" -m pip install -q --index-url https://download.pytorch.org/whl/cpu "torch>=2.6" \
      || "$VPY" -m pip install -q "torch>=2.6"
  fi
fi
SPEC="$ROOT"
[ -n "${EXTRAS:-}" ] && SPEC="$ROOT[$EXTRAS]"
echo "[setup] installing minillm${EXTRAS:+[$EXTRAS]}" >&2
"$VPY" -m pip install -q -e "$SPEC" 2>&1 | grep -v -i "warning" >&2 || true
"$VPY" -c "import minillm" || { echo "[setup] installing minillm failed" >&2; exit 1; }
export PATH="$VENV/bin:$PATH"
