"""Masks of the four categories: FlexAttention ``mask_mod``s, dense references, layout-built BlockMasks.

What users call is here; the building blocks stay in the submodules (:mod:`.mask_mods`: one factory per
category part and per base-mask part; :mod:`.block`: per-category tiles and pair counts; :mod:`.reference`).
"""

from .block import build_block_mask, clear_block_mask_cache
from .mask_mods import (
           BaseMask,
           generate_blindsight_mask_mod,
           generate_category_mask_mod,
           generate_head_category_mask_mod,
)
from .reference import reference_mask

__all__ = ["BaseMask", "build_block_mask", "clear_block_mask_cache", "reference_mask", "generate_category_mask_mod",
           "generate_head_category_mask_mod", "generate_blindsight_mask_mod"]
