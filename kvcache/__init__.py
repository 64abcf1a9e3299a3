"""kvcache chapter."""
