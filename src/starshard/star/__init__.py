"""Star attention: two-phase distributed long-context inference of Hugging Face models.

Phase 1 encodes the context in blocks (each behind an anchor block, no communication); phase 2
lets every query and generated token attend to every host's cache with an exact distributed
softmax. ``method="ring"`` and ``method="dense"`` run in the same engine as exact baselines.
"""
from .engine import GenerationResult, StarEngine, check_model
from .partition import Piece, Plan, default_block_size, plan_blocks, plan_zigzag

__all__ = ["StarEngine", "GenerationResult", "check_model", "Piece", "Plan", "plan_blocks",
           "plan_zigzag", "default_block_size"]
