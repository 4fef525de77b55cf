"""Benchmarks; run each from the repository root as ``python bench/X.py`` or ``python -m bench.X``."""
