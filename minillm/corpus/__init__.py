"""corpus: see docs/ARCHITECTURE.md."""
