"""Integrations of starshard's attention with model libraries (``hf``: Hugging Face transformers;
``megatron``: Megatron-core). Each is imported on its own, so neither library is needed for the
other or for the ops."""
