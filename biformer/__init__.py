"""BiFormer and Bi-Level Routing Attention for PyTorch.

Importing ``biformer`` registers ``biformer_tiny``, ``biformer_small``, ``biformer_base`` and
``biformer_stl`` with timm.
"""
from .layers import BiLevelRoutingAttention, GlobalAttentionLCE
from .models import BiFormer, CheckpointMismatchError, checkpoint_filter_fn
from .ops import RegionGrid, Routing, bi_level_routing_attention

__version__ = "0.1.0"


def save_pretrained(model, directory, **kwargs):  # type: ignore[no-untyped-def]
    """Write ``model`` as a Hugging Face Hub folder in timm's layout; see :func:`biformer.hub.save_pretrained`."""
    from .hub import save_pretrained as save

    return save(model, directory, **kwargs)


__all__ = [
    "BiFormer",
    "BiLevelRoutingAttention",
    "CheckpointMismatchError",
    "GlobalAttentionLCE",
    "RegionGrid",
    "Routing",
    "bi_level_routing_attention",
    "checkpoint_filter_fn",
    "save_pretrained",
]
