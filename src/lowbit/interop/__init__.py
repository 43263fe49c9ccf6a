"""Other runtimes' formats, written from lowbit models and read back into them without
re-quantizing: GGUF for llama.cpp (``gguf_export``, ``gguf_import``) and Hugging Face
checkpoints in the compressed-tensors format that transformers and vLLM load
(``compressed_tensors``). Each module imports its format's package only when used."""
