"""starshard: long-context attention (S2 block-sparse kernels, Star attention)."""
from .kvcache import KVCache
from .layouts import BlockLayout, local_stride
from .ops.decode import sparse_attention_kvcache
from .ops.sparse_attn import sparse_attention, sparse_attention_varlen

__version__ = "0.1.0"
__all__ = ["BlockLayout", "local_stride", "sparse_attention", "sparse_attention_varlen",
           "sparse_attention_kvcache", "KVCache", "merge_attention", "__version__"]


def __getattr__(name):
    if name == "merge_attention":
        from .ops.merge import merge_attention
        return merge_attention
    raise AttributeError(f"module 'starshard' has no attribute {name!r}")
