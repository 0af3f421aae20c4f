"""Measurements of ccpurify on the model zoo, run as modules from the repository root:
``python -m benchmarks.grid``, ``python -m benchmarks.zoo``; one-off investigations live in
``benchmarks.experiments``. ``benchmarks.common`` holds the shared harness (zoo entries,
validation sets, scoring, latency, result files)."""
