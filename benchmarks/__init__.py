"""Benchmark scripts (`python -m benchmarks.<script>`); each prints one JSON object per line."""
