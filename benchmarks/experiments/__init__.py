"""One-off investigations (``python -m benchmarks.experiments.<name>``): each answers one question
and writes under ``benchmarks/results/experiments/``."""
