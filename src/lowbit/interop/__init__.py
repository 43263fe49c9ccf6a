"""Checkpoints other tools read and write: ``lowbit.interop.compressed_tensors`` writes and reads
Hugging Face checkpoints in the compressed-tensors format (what transformers and vLLM load)."""
