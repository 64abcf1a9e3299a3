"""vLLM scripts: offline generation, its OpenAI server driven by our harness, parallelism, quantized checkpoints."""
