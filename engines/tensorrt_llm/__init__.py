"""TensorRT-LLM through its LLM API, for readers who have it (not run here)."""
