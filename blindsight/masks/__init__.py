"""Masks: category and base mask_mods, dense references, and layout-built BlockMasks."""

from .block import assemble_block_mask, build_block_mask, category_tiles, clear_block_mask_cache, pair_counts
from .mask_mods import (
    BaseMask,
    generate_bidirectional_mask_mod,
    generate_blindsight_mask_mod,
    generate_category_mask_mod,
    generate_causal_mask_mod,
    generate_diagonal_mask_mod,
    generate_head_category_mask_mod,
    generate_key_padding_mask_mod,
    generate_same_image_mask_mod,
    generate_sink_key_mask_mod,
    generate_sliding_window_mask_mod,
    generate_tensor_mask_mod,
    generate_text_pair_mask_mod,
)
from .reference import reference_base_mask, reference_mask
