"""BiFormer models, registered with timm on import."""
from .biformer import (
    BiFormer,
    BiFormerBlock,
    BiFormerStage,
    CheckpointMismatchError,
    checkpoint_filter_fn,
)

__all__ = ["BiFormer", "BiFormerBlock", "BiFormerStage", "CheckpointMismatchError", "checkpoint_filter_fn"]
