"""The benchmark suite behind `s4serve bench` / `make bench` (docs/loadtest.md)."""
