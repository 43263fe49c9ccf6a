"""Other runtimes' formats: GGUF (llama.cpp) and compressed-tensors (Hugging Face) checkpoints,
written from lowbit models and read back into them."""
