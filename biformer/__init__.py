"""BiFormer and Bi-Level Routing Attention for PyTorch.

Importing ``biformer`` registers ``biformer_tiny``, ``biformer_small``, ``biformer_base`` and
``biformer_stl`` with timm.
"""
from .layers import BiLevelRoutingAttention, GlobalAttentionLCE
from .models import BiFormer, CheckpointMismatchError, checkpoint_filter_fn
from .ops import RegionGrid, Routing, bi_level_routing_attention

__version__ = "0.1.0"

__all__ = [
    "BiFormer",
    "BiLevelRoutingAttention",
    "CheckpointMismatchError",
    "GlobalAttentionLCE",
    "RegionGrid",
    "Routing",
    "bi_level_routing_attention",
    "checkpoint_filter_fn",
]
