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
from torch.nn.attention.flex_attention import flex_attention

from ..categories import Category
from ..layout import Layout
from ..masks import BaseMask, build_block_mask
from .segments import is_plain_causal

__all__ = ["flex_sparse_attention"]

_KERNELS: dict = {}


def _kernel(device: torch.device):
    dynamic = device.type != "cpu"
    if dynamic not in _KERNELS:
        _KERNELS[dynamic] = torch.compile(flex_attention, dynamic=dynamic)
    return _KERNELS[dynamic]


def flex_sparse_attention(q, k, v, attn_mask, layout: Layout, heads: list[int], scale: float, is_causal: bool,
                          block_size: int = 128) -> torch.Tensor:
    """SDPA(q, k, v, attn_mask or is_causal, scale) AND the per-head categories, on FlexAttention."""
    score_mod = None
    if attn_mask is None:
        base = BaseMask(causal=is_causal)
    elif attn_mask.dtype == torch.bool:
        plain = all(is_plain_causal(attn_mask, b) for b in range(attn_mask.shape[0]))
        base = BaseMask() if plain else BaseMask.from_tensor(attn_mask)
    else:  # additive float mask: -inf entries are masked, the rest is a bias on the scaled scores
        base = BaseMask.from_tensor(attn_mask != float("-inf"))
        bias = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, q_idx, kv_idx].to(score.dtype)

    block_mask = build_block_mask(layout.to(q.device), [Category(h) for h in heads], base, block_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        return _kernel(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                         enable_gqa=q.shape[1] != k.shape[1])
