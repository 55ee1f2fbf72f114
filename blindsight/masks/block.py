"""BlockMasks built from the layout analytically, without evaluating the S x S mask.

The sequence is cut into *runs*: maximal stretches of tokens that share image id, sink flag, padding,
bidirectional group and tile. Between two runs every category's keep/drop is constant, and the base
mask's pair count over the rectangle has a closed form (causal triangle, sliding band, full block).
Counting kept pairs per run pair and summing them per tile gives the exact tile counts that
``create_block_mask`` would get from the dense mask: full tile = all ``Q_BLOCK x KV_BLOCK`` pairs kept
(tiles that cross the sequence end are never full, as in torch), partial = some. Cost: O(R^2) for R runs
(~S/128 + 3 per image), shared by every layer and head of a category; results are cached per layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..cache import BoundedCache, tensor_digest
from ..categories import Category
from ..layout import Layout
from ..stats import count
from .mask_mods import BaseMask, generate_blindsight_mask_mod

__all__ = ["pair_counts", "category_tiles", "assemble_block_mask", "build_block_mask", "clear_block_mask_cache"]

# (layout, base, block) -> per-category tiles, [4, B, S/128, S/128] bools twice: one layout serves every layer
_CACHE = BoundedCache("masks.block_tiles", max_entries=16, max_bytes=256 << 20)


def _triangle_prefix(n: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """sum over x <= n of clamp(x, 0, width)."""
    n = n.clamp_min(0)
    return torch.where(n <= width, n * (n + 1) // 2, width * (width + 1) // 2 + (n - width) * width)


def _pairs_key_at_most(qs, qe, ks, ke, shift: int) -> torch.Tensor:
    """Number of (q, k) in [qs, qe) x [ks, ke) with k <= q - shift."""
    width = ke - ks
    return _triangle_prefix(qe - shift - ks, width) - _triangle_prefix(qs - shift - ks, width)


def _runs(layout: Layout, row: int, base: BaseMask, block: tuple[int, int]):
    S = layout.seq_len
    image, sink = layout.image[row].cpu().long(), layout.sink[row].cpu()
    valid = base.key_padding[row].cpu() if base.key_padding is not None else torch.ones(S, dtype=torch.bool)
    groups = base.bidirectional_groups[row].cpu().long() if base.bidirectional_groups is not None else None
    change = torch.zeros(S, dtype=torch.bool)
    for attr in (image, sink, valid) + ((groups,) if groups is not None else ()):
        change[1:] |= attr[1:] != attr[:-1]
    change[:: block[0]] = True
    change[:: block[1]] = True
    starts = change.nonzero().flatten()
    ends = torch.cat([starts[1:], torch.tensor([S])])
    g = groups[starts] if groups is not None else None
    return starts, ends, image[starts], sink[starts], valid[starts], g


def _row_pair_counts(layout: Layout, row: int, categories: Sequence[Category], base: BaseMask, block):
    """Per category: kept pairs per tile ``[nq, nk]`` (int64) of one row, and the base's own counts."""
    S = layout.seq_len
    starts, ends, img, snk, valid, grp = _runs(layout, row, base, block)
    qs, qe, ks, ke = starts[:, None], ends[:, None], starts[None, :], ends[None, :]
    area = (qe - qs) * (ke - ks)
    if base.causal:
        geom = _pairs_key_at_most(qs, qe, ks, ke, 0)
        if base.sliding_window is not None:
            geom = geom - _pairs_key_at_most(qs, qe, ks, ke, int(base.sliding_window))
        if grp is not None:
            geom = torch.where((grp[:, None] == grp[None, :]) & (grp[:, None] >= 0), area, geom)
    else:
        geom = area
    base_pairs = torch.where(valid[None, :], geom, 0)
    # q == k pairs: runs are disjoint, so only a run with itself; the base keeps the diagonal unless padded
    diagonal = torch.diag(torch.where(valid, ends - starts, 0))
    both = (img[:, None] >= 0) & (img[None, :] >= 0)
    same = img[:, None] == img[None, :]
    sink_k = snk[None, :].expand_as(same)
    nq, nk = -(-S // block[0]), -(-S // block[1])
    index = ((starts // block[0])[:, None].expand_as(area), (starts // block[1])[None, :].expand_as(area))

    def per_tile(pairs):
        return torch.zeros(nq, nk, dtype=torch.int64).index_put_(index, pairs, accumulate=True)

    out = {}
    for c in categories:
        if c == Category.DENSE:
            kept = base_pairs
        elif c == Category.INTRA_SINK:
            kept = torch.where(~both | same | sink_k, base_pairs, 0)
        elif c == Category.INTRA:
            kept = torch.where(~both | same, base_pairs, 0)
        else:  # SINK
            kept = torch.where(~both | sink_k, base_pairs, diagonal)
        out[c] = per_tile(kept)
    return out


def pair_counts(
    layout: Layout, categories: Sequence[Category | str], base: BaseMask | None = None, block_size=128
) -> dict[Category, torch.Tensor]:
    """Kept (q, k) pairs per tile for each category: ``{category: int64 [B, nq, nk]}``.

    ``base`` must be analytic (no tensor mask). Summing a tensor gives the category's kept pairs.
    """
    base = base if base is not None else BaseMask()
    if not base.is_analytic:
        raise ValueError("pair_counts needs an analytic base mask (causal/window/padding/bidirectional), not a tensor")
    block = _block(block_size)
    cats = sorted({Category.parse(c) for c in categories})
    rows = [_row_pair_counts(layout, r, cats, base, block) for r in range(layout.batch_size)]
    return {c: torch.stack([r[c] for r in rows]) for c in cats}


def _ordered(dense: torch.Tensor):
    """Like torch's ``_dense_to_ordered``: per-row block count and the column indices, present first."""
    dense = dense.to(torch.int32)
    return (
        dense.sum(-1).to(torch.int32).contiguous(),
        torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32).contiguous(),
    )


def tensor_tiles(mask: torch.Tensor, B: int, H: int, block) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all) per tile of a dense bool mask, padded as torch pads (tiles crossing the end are not full)."""
    Q, KV = mask.shape[-2:]
    pad_q, pad_k = -Q % block[0], -KV % block[1]
    m = torch.nn.functional.pad(mask.expand(B, H, Q, KV), (0, pad_k, 0, pad_q))
    m = m.view(B, H, (Q + pad_q) // block[0], block[0], (KV + pad_k) // block[1], block[1])
    sums = m.sum(dim=(3, 5))
    return sums > 0, sums == block[0] * block[1]


def category_tiles(layout: Layout, base: BaseMask | None = None, block_size=128) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) bool ``[4, B, nq, nk]``, indexed by ``Category``: the tiles of base AND category.

    Shared by every layer and head of a category; cached per (layout, base, block size).
    """
    base = base if base is not None else BaseMask()
    block = _block(block_size)
    key = (layout.key, str(layout.image.device), block, base.causal, base.sliding_window,
           tensor_digest(base.key_padding), tensor_digest(base.bidirectional_groups))
    hit = _CACHE.get(key)
    if hit is not None:
        count("block_masks_reused")
        return hit
    count("block_masks_built")
    counts = pair_counts(layout, list(Category), base, block)
    tiles = torch.stack([counts[c] for c in Category])
    full = tiles == block[0] * block[1]
    device = layout.image.device
    return _CACHE.put(key, (((tiles > 0) & ~full).to(device), full.to(device)))


def assemble_block_mask(
    partial_c: torch.Tensor,
    full_c: torch.Tensor,
    head_index: torch.Tensor,
    mask_mod,
    seq_len: int,
    block: tuple[int, int],
    allowed: torch.Tensor | None = None,
    q_len: int | None = None,
) -> BlockMask:
    """A BlockMask for query heads ``head_index`` (Category values) from per-category tiles.

    ``allowed``: a bool base mask ``[B|1, H|1, S, S]`` whose tiles are intersected with category tiles computed
    without a base: full only where both are full, computed wherever both have something (a tile whose
    intersection is empty may be kept as partial; the mask_mod keeps the result exact). Traceable: the
    compiler pass calls it inside the graph. ``q_len``: fewer query rows than ``seq_len`` keys (the tiles' rows
    are then those of the queries).
    """
    partial = partial_c[head_index].transpose(0, 1)  # [B, H, nq, nk]
    full = full_c[head_index].transpose(0, 1)
    if allowed is not None:
        B, H = partial.shape[:2]
        t_any, t_all = tensor_tiles(allowed, B, H, block)
        some = (partial | full) & t_any
        full = full & t_all
        partial = some & ~full
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    # the query-side (backward) indices from the transposed tiles: torch's own transpose uses vmap, which is
    # unavailable inside a custom op's body (where the flex lowering builds its masks)
    q_num, q_idx = _ordered(partial.transpose(-1, -2))
    full_q_num, full_q_idx = _ordered(full.transpose(-1, -2))
    lengths = (seq_len if q_len is None else q_len, seq_len)
    return BlockMask(seq_lengths=lengths, kv_num_blocks=kv_num, kv_indices=kv_idx,
                     full_kv_num_blocks=full_num, full_kv_indices=full_idx, q_num_blocks=q_num, q_indices=q_idx,
                     full_q_num_blocks=full_q_num, full_q_indices=full_q_idx, BLOCK_SIZE=block, mask_mod=mask_mod)


def build_block_mask(
    layout: Layout,
    categories: Sequence[Category | str],
    base: BaseMask | None = None,
    block_size: int | tuple[int, int] = 128,
    q_offset: int = 0,
) -> BlockMask:
    """The BlockMask (H = ``len(categories)`` query heads) of base AND each head's category.

    ``q_offset`` (a multiple of the query block): the queries are the rows from ``q_offset`` on of the layout's
    sequence (DESIGN §2, queries at an offset); the base is then a tensor mask over those rows (or no mask).

    With an analytic base it equals ``create_block_mask(generate_blindsight_mask_mod(...))`` exactly. With a
    tensor base, see :func:`assemble_block_mask`: a few tiles may be partial that torch would skip, never
    the reverse. Tiles come from :func:`category_tiles` (cached per layout).
    """
    base = base if base is not None else BaseMask()
    block = _block(block_size)
    device = layout.image.device
    head_index = torch.tensor([int(Category.parse(c)) for c in categories], device=device)
    tiles_base = base if base.is_analytic else BaseMask(causal=False)
    if q_offset:
        analytic = base.causal or base.key_padding is not None or base.bidirectional_groups is not None
        if q_offset % block[0] or analytic:
            raise ValueError("build_block_mask: q_offset must be a multiple of the query block, with a tensor base "
                             "or none")
        tiles_base = BaseMask(causal=False)
    partial_c, full_c = category_tiles(layout, tiles_base, block)
    partial_c, full_c = partial_c[:, :, q_offset // block[0]:], full_c[:, :, q_offset // block[0]:]
    mask_mod = generate_blindsight_mask_mod(layout.image, layout.sink, head_index, base, q_offset)
    allowed = None if base.is_analytic else base.tensor.to(device)
    return assemble_block_mask(partial_c, full_c, head_index, mask_mod, layout.seq_len, block, allowed,
                               layout.seq_len - q_offset if q_offset else None)


def _block(block_size) -> tuple[int, int]:
    return (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)


def clear_block_mask_cache() -> None:
    _CACHE.clear()
