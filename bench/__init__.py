"""Benchmarks: `make bench` (bench/run.py) and Redis memory sizing (bench/memory.py)."""
