"""The GPU (and reference) lowering: FlexAttention with a per-head BlockMask built from the layout.

Called at run time inside the custom op ``blindsight::attention`` with real tensors: the BlockMask is
assembled from per-category tiles that are computed once per layout (``blindsight.masks.category_tiles``,
cached), and the kernel is ``flex_attention`` compiled by torch.compile. On CUDA it is compiled with dynamic
shapes, so a new prompt length reuses the kernel. On CPU (a reference lowering there: ``segments`` is the
default) it is compiled per shape: Inductor's CPU flex kernel with symbolic sizes fails to build its C++ for
some masks in torch 2.13 (``cur_kvSplitSize`` undeclared), so each new (batch, length) compiles once.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from ..cache import BoundedCache
from ..categories import Category
from ..layout import Layout
from ..masks import BaseMask, build_block_mask
from ..masks.block import category_tiles
from .cost import KernelRates, Work, best_seconds
from .segments import is_causal_mask

__all__ = ["flex_sparse_attention", "flex_work", "measure_flex_rates"]

_KERNELS = BoundedCache("lowering.flex_kernels", max_entries=2)  # dynamic or not: the compiled flex_attention


def _kernel(device: torch.device):
    dynamic = device.type != "cpu"
    return _KERNELS.get_or_build(dynamic, lambda: torch.compile(flex_attention, dynamic=dynamic))


def _base(attn_mask, is_causal: bool) -> BaseMask:
    """The analytic part of the call's mask (what decides which tiles are computed)."""
    if attn_mask is None:
        return BaseMask(causal=is_causal)
    return BaseMask() if is_causal_mask(attn_mask) else BaseMask(causal=False)


def _query_start(L: int, S: int, block_size: int) -> tuple[int, int]:
    """(o0, pad): queries at offset o = S - L start at the query tile ``o0 = o - pad`` of the whole sequence; the
    call runs ``pad`` rows more at the front (the first tile's earlier rows, discarded), so its tiles are the
    sequence's tiles from row ``o0`` on."""
    o = S - L
    return o - o % block_size, o % block_size


def flex_work(q, k, attn_mask, layout: Layout, heads: list[int], is_causal: bool, block_size: int = 128,
              rates: KernelRates | None = None) -> tuple[Work, Work]:
    """(sparse, dense) work of this call: the pairs of the tiles FlexAttention computes, and SDPA's pairs."""
    B, H, L, _ = q.shape
    S = k.shape[2]
    if L < S:  # the query tiles of the call's rows, over every key tile (its mask is a tensor)
        o0, _ = _query_start(L, S, block_size)
        partial, full = category_tiles(layout.to(q.device), BaseMask(causal=False), block_size)
        index = torch.tensor(heads, device=partial.device)
        tiles = int((partial | full)[index, :, o0 // block_size:].sum())
        return Work(small_pairs=tiles * block_size * block_size, calls=1), Work(dense_pairs=B * H * L * S, calls=1)
    base = _base(attn_mask, is_causal)
    partial, full = category_tiles(layout.to(q.device), base, block_size)
    index = torch.tensor(heads, device=partial.device)
    tiles = int((partial | full)[index].sum())  # over heads and batch rows
    dense_pairs = B * H * (S * (S + 1) / 2 if base.causal else S * S)
    return Work(small_pairs=tiles * block_size * block_size, calls=1), Work(dense_pairs=dense_pairs, calls=1)


def measure_flex_rates(dtype: torch.dtype, head_dim: int, device: torch.device | None = None) -> KernelRates:
    """Seconds per pair of SDPA (causal) and of FlexAttention's computed tiles, on ``device``, at 2K tokens."""
    device = device or torch.device("cuda")
    S, H = 2048, 8
    q = torch.randn(1, H, S, head_dim, device=device, dtype=dtype)
    dense = best_seconds(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), device)
    dense /= H * S * (S + 1) / 2
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, 1, S, S, device=device)
    tiles = int(mask.kv_num_blocks.sum() + (mask.full_kv_num_blocks.sum() if mask.full_kv_num_blocks is not None
                                              else 0))
    kernel = _kernel(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        flex = best_seconds(lambda: kernel(q, q, q, block_mask=mask), device)
    flex /= H * tiles * mask.BLOCK_SIZE[0] * mask.BLOCK_SIZE[1]
    tiny = q[:, :1, :16]
    call = best_seconds(lambda: F.scaled_dot_product_attention(tiny, tiny, tiny), device, repeat=20)
    return KernelRates(dense, flex, call)


def flex_sparse_attention(q, k, v, attn_mask, layout: Layout, heads: list[int], scale: float, is_causal: bool,
                          block_size: int = 128) -> torch.Tensor:
    """SDPA(q, k, v, attn_mask or is_causal, scale) AND the per-head categories, on FlexAttention.

    Queries at an offset (``q`` has the last L of the S rows): the call starts at the query tile of the whole
    sequence that holds its first row, its mask (a tensor, or none) padded at the front to match; the extra rows
    are computed and dropped, so every tile is one of the whole sequence's.
    """
    L, S = q.shape[2], k.shape[2]
    o0, pad = _query_start(L, S, block_size) if L < S else (0, 0)
    if pad:
        q = F.pad(q, (0, 0, pad, 0))
        if attn_mask is not None:  # the extra rows attend everything (no empty row), and are dropped
            attn_mask = torch.cat([attn_mask.new_ones(*attn_mask.shape[:2], pad, S) if attn_mask.dtype == torch.bool
                                   else attn_mask.new_zeros(*attn_mask.shape[:2], pad, S), attn_mask], 2)
    score_mod = None
    if attn_mask is None:
        base = BaseMask(causal=is_causal)
    elif attn_mask.dtype == torch.bool:
        base = BaseMask() if L == S and is_causal_mask(attn_mask) else BaseMask.from_tensor(attn_mask)
    else:  # additive float mask: -inf entries are masked, the rest is a bias on the scaled scores
        base = BaseMask.from_tensor(attn_mask != float("-inf"))
        bias = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, q_idx, kv_idx].to(score.dtype)

    block_mask = build_block_mask(layout.to(q.device), [Category(h) for h in heads], base, block_size, q_offset=o0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        out = _kernel(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                enable_gqa=q.shape[1] != k.shape[1])
    return out[:, :, pad:] if pad else out
