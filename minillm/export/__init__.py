"""export: see docs/ARCHITECTURE.md."""
