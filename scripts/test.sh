#!/usr/bin/env bash
# Set up .venv with the dev extra and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=dev source scripts/_setup_venv.sh
exec .venv/bin/python -m pytest -q "$@"
