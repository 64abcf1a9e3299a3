"""benchmarks chapter."""
