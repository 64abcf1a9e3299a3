"""quantization chapter."""
