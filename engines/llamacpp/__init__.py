"""llama.cpp through llama-cpp-python: the default model's GGUF offline and behind its OpenAI server."""
