"""vLLM scripts: offline generation, its OpenAI server driven by our harness, tensor parallelism, quantized checkpoints."""
