"""Dense reference masks built by broadcasting straight from the definitions (DESIGN.md §2), for tests.

Deliberately independent of the mask_mods and of the block-mask builder: no shared code but the layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..categories import Category
from ..layout import Layout
from .mask_mods import BaseMask

__all__ = ["reference_base_mask", "reference_mask"]


def reference_base_mask(base: BaseMask, batch_size: int, seq_len: int,
                        rows: torch.Tensor | None = None) -> torch.Tensor:
    """bool ``[B, 1 or H, R, S]`` of the model's own mask, for query ``rows`` (default: all S)."""
    rows = torch.arange(seq_len) if rows is None else rows
    q = rows[:, None]
    k = torch.arange(seq_len)[None, :]
    geom = torch.ones(rows.numel(), seq_len, dtype=torch.bool)
    if base.causal:
        geom = k <= q
    if base.sliding_window is not None:
        geom = geom & (q - k < base.sliding_window)
    m = geom.expand(batch_size, 1, rows.numel(), seq_len).clone()
    if base.bidirectional_groups is not None and base.causal:
        g = base.bidirectional_groups
        m |= ((g[:, rows, None] == g[:, None, :]) & (g[:, rows, None] >= 0))[:, None]
    if base.key_padding is not None:
        m &= base.key_padding[:, None, None, :].bool()
    if base.tensor is not None:
        m = m & base.tensor[..., rows, :]
    return m


def reference_mask(layout: Layout, categories: Sequence[Category | str], base: BaseMask | None = None,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """bool ``[B, H, R, S]``: base AND the category of each query head (H = len(categories)), for query ``rows``
    (default: all S; a few rows keep a long prompt's reference small)."""
    base = base if base is not None else BaseMask()
    B, S = layout.image.shape
    rows = torch.arange(S) if rows is None else rows
    img = layout.image.long()
    a = img[:, rows, None]  # query's image
    b = img[:, None, :]  # key's image
    both_images = (a >= 0) & (b >= 0)
    sink_k = layout.sink[:, None, :].expand(B, rows.numel(), S)
    same = a == b
    diag = (rows[:, None] == torch.arange(S)[None, :])[None]
    keeps = {
        Category.DENSE: torch.ones(B, rows.numel(), S, dtype=torch.bool),
        Category.INTRA_SINK: same | sink_k,
        Category.INTRA: same,
        Category.SINK: sink_k | diag,
    }
    per_head = torch.stack([~both_images | keeps[Category.parse(c)] for c in categories], dim=1)
    return reference_base_mask(base, B, S, rows) & per_head
