"""parallelism chapter."""
