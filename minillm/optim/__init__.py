"""optim: see docs/ARCHITECTURE.md."""
