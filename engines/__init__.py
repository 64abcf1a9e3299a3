"""engines chapter."""
