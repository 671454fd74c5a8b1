"""fastmlp benchmarks: `pytest bench` (pytest-benchmark) and `python -m bench.table`."""
