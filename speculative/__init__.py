"""speculative chapter."""
