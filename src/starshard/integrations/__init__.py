"""Integrations of starshard's attention with model libraries (``hf``: Hugging Face transformers;
``megatron``: Megatron-core). Each is imported on its own, so neither library is needed for the
other or for the ops."""
from ..layouts import local_stride

_DENSE = {}


def dense_layout(heads):
    """A dense causal layout (every block allowed) of ``heads`` query heads, for the layers
    given no layout."""
    if heads not in _DENSE:
        _DENSE[heads] = local_stride(heads, 64, 1, 1)
    return _DENSE[heads]
