"""metricops benchmarks: `python -m benchmarks` (CLI) or `pytest benchmarks` (pytest-benchmark)."""
