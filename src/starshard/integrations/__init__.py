"""Integrations of starshard's attention with model libraries (``hf``: Hugging Face transformers)."""
