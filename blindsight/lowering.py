"""The CPU lowering: exact attention per image segment over gathered keys, on SDPA's fused kernels.

On CPU, Inductor's FlexAttention kernel is several times slower than SDPA's flash kernel even on dense
tiles (DESIGN.md §7), so skipping tiles does not pay. Instead, for each head category:
- DENSE heads: one SDPA call over all rows, with the call's own mask (the fused kernel);
- text query rows of sparse heads: one SDPA call over all keys (text queries keep every pair);
- the rows of image segment i: one SDPA call over only the keys the category can keep for them: text keys,
  image i's own tokens, and (INTRA_SINK, SINK) the other images' sinks; the call's own mask and the category
  rule restricted to those keys give the exact mask. For a causal call, keys after the segment are dropped.
Softmax is order-free over keys and each row's output is written back in place, so the result is the
same attention (to float rounding) as SDPA with the full mask of DESIGN §2.

It runs as the custom op ``blindsight::segment_attention``: Inductor keeps it as an extern kernel call, and
its Python body runs at run time with the real layout (data-dependent segment sizes need no tracing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .profile import Category

__all__ = ["segment_attention"]


def _segments(img: torch.Tensor) -> list[tuple[int, int, int]]:
    """(image id, start, end) of each image segment of one row (segments are contiguous by definition)."""
    pos = (img >= 0).nonzero().flatten()
    if pos.numel() == 0:
        return []
    ids = img[pos]
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[1:] = ids[1:] != ids[:-1]
    ends = torch.ones_like(starts)
    ends[:-1] = starts[1:]
    return list(zip(ids[starts].tolist(), pos[starts].tolist(), (pos[ends] + 1).tolist()))


def _base_rows(attn_mask, b: int, heads: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor, is_causal: bool):
    """The call's own mask on (rows x keys): bool or float ``[Hc|1, R, K]``, or None for no mask."""
    if attn_mask is not None:
        m = attn_mask[b if attn_mask.shape[0] > 1 else 0]
        m = m[heads] if m.shape[0] > 1 else m
        return m[:, rows][:, :, keys]
    if is_causal:
        return (keys[None, :] <= rows[:, None])[None]
    return None


def _combine(base, keep: torch.Tensor | None):
    """base AND keep, as SDPA's attn_mask (float base: -inf where keep is False)."""
    if keep is None:
        return base
    if base is None:
        return keep
    if base.dtype == torch.bool:
        return base & keep
    return base.masked_fill(~keep, float("-inf"))


@torch.library.custom_op("blindsight::segment_attention", mutates_args=())
def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    image: torch.Tensor,
    sink: torch.Tensor,
    heads: list[int],
    scale: float,
    is_causal: bool,
) -> torch.Tensor:
    """SDPA(q, k, v, attn_mask or is_causal, scale) AND the per-head categories ``heads`` (Category values)."""
    B, H, S, _ = q.shape
    rep = H // k.shape[1]
    out = q.new_empty(B, H, S, v.shape[-1])
    heads_t = torch.tensor(heads, device=q.device)
    all_keys = torch.arange(S, device=q.device)
    for b in range(B):
        img, snk = image[b], sink[b]
        segments = _segments(img)
        text_rows = (img < 0).nonzero().flatten()
        text_keys = text_rows
        sinks = snk.nonzero().flatten()
        for c in sorted(set(heads)):
            hs = (heads_t == c).nonzero().flatten()
            qc, kc, vc = q[b, hs], k[b, hs // rep], v[b, hs // rep]
            if c == Category.DENSE or not segments:
                mask = None
                if attn_mask is not None:
                    mask = attn_mask[b if attn_mask.shape[0] > 1 else 0]
                    mask = mask[hs] if mask.shape[0] > 1 else mask
                out[b, hs] = F.scaled_dot_product_attention(
                    qc, kc, vc, attn_mask=mask, is_causal=attn_mask is None and is_causal, scale=scale)
                continue
            if text_rows.numel():
                mask = _base_rows(attn_mask, b, hs, text_rows, all_keys, is_causal)
                out[b, hs[:, None], text_rows[None, :]] = F.scaled_dot_product_attention(
                    qc[:, text_rows], kc, vc, attn_mask=mask, scale=scale)
            for i, s0, s1 in segments:
                own = torch.arange(s0, s1, device=q.device)
                parts = [text_keys]
                if c in (Category.INTRA_SINK, Category.SINK):
                    parts.append(sinks[img[sinks] != i])
                parts.append(own)
                keys = torch.cat(parts)
                if attn_mask is None and is_causal:
                    keys = keys[keys < s1]  # later keys are never visible to these rows
                rows = own
                keep = None
                if c == Category.SINK:  # own image: only its sinks and the query itself
                    in_own = img[keys] == i
                    keep = ~in_own[None, :] | snk[keys][None, :] | (keys[None, :] == rows[:, None])
                mask = _combine(_base_rows(attn_mask, b, hs, rows, keys, is_causal), keep)
                out[b, hs[:, None], rows[None, :]] = F.scaled_dot_product_attention(
                    qc[:, rows], kc[:, keys], vc[:, keys], attn_mask=mask, scale=scale)
    return out


@segment_attention.register_fake
def _(q, k, v, attn_mask, image, sink, heads, scale, is_causal):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def default_scale(q: torch.Tensor, scale) -> float:
    return 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
