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

import functools
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


def _base_rows(attn_mask, b: int, heads: torch.Tensor, rows, keys, is_causal: bool):
    """The call's own mask on (rows x keys): bool or float ``[Hc|1, R, K]``, or None for no mask.

    ``rows``/``keys`` None: all of them, without copying the S x S mask.
    """
    if attn_mask is not None:
        m = attn_mask[b if attn_mask.shape[0] > 1 else 0]
        m = m[heads] if m.shape[0] > 1 else m
        m = m if rows is None else m[:, rows]
        return m if keys is None else m[:, :, keys]
    if is_causal:
        return (keys[None, :] <= rows[:, None])[None]
    return None


def _text_runs(rows: torch.Tensor, split: bool) -> list[torch.Tensor]:
    """The text rows as maximal runs of consecutive positions (``split``), or all of them at once."""
    if not split or rows.numel() <= 1:
        return [rows]
    breaks = ((rows[1:] - rows[:-1]) != 1).nonzero().flatten() + 1
    return list(torch.tensor_split(rows, breaks.tolist()))


def _flash(q, k, v, causal: bool, scale: float):
    """(output, log-sum-exp) of SDPA's fused CPU kernel; ``causal`` aligns query and key starts."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse


def _merge(terms):
    """Attention over the union of disjoint key sets from each set's (output, log-sum-exp)."""
    if len(terms) == 1:
        return terms[0][0]
    lse = torch.stack([t[1] for t in terms])
    total = torch.logsumexp(lse, dim=0)
    return sum(o * torch.exp(l - total).unsqueeze(-1).to(o.dtype) for o, l in terms)


def _segment_causal(qh, kh, vh, c, i, s0, s1, text_rows, sinks, img, snk, scale):
    """Rows of image segment i under a causal mask, category c: terms over disjoint key sets, merged.

    Keys before the segment that the category keeps (text; other images' sinks for INTRA_SINK/SINK) are
    visible to every row; the segment's own keys are causal (INTRA, INTRA_SINK), or for SINK its own sinks
    (causal) plus each row's own key.
    """
    q = qh[:, :, s0:s1]
    prefix = text_rows[text_rows < s0]
    if c in (Category.INTRA_SINK, Category.SINK):
        prefix = torch.cat([prefix, sinks[(sinks < s0) & (img[sinks] != i)]])
    terms = []
    if prefix.numel():
        terms.append(_flash(q, kh[:, :, prefix], vh[:, :, prefix], False, scale))
    if c != Category.SINK:
        terms.append(_flash(q, kh[:, :, s0:s1], vh[:, :, s0:s1], True, scale))
    else:
        n_sinks = int(snk[s0:s1].sum())
        terms.append(_flash(q, kh[:, :, s0:s0 + n_sinks], vh[:, :, s0:s0 + n_sinks], True, scale))
        own = (q * kh[:, :, s0:s1]).sum(-1) * scale  # each row with its own key
        own[:, :, :n_sinks] = float("-inf")  # those rows' own key is a sink, counted above
        terms.append((vh[:, :, s0:s1], own.float()))
    return _merge(terms)


@functools.lru_cache(maxsize=2)
def _lower_triangle(S: int, device: str) -> torch.Tensor:
    return torch.ones(S, S, dtype=torch.bool, device=device).tril()


def _is_plain_causal(mask: torch.Tensor, b: int) -> bool:
    """Is row b of a bool mask exactly the causal mask (for every head)? One S x S comparison per call."""
    if mask.dtype != torch.bool or mask.shape[-1] != mask.shape[-2]:
        return False
    m = mask[b if mask.shape[0] > 1 else 0]
    tril = _lower_triangle(mask.shape[-1], str(mask.device))
    return all(torch.equal(m[h], tril) for h in range(m.shape[0]))


def _4d(mask):
    return None if mask is None else mask[None]


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
    sparse_heads = (heads_t != Category.DENSE).nonzero().flatten()
    # SDPA's fused CPU kernels need 4-D inputs (3-D ones take the slow math path): keep a batch dim of 1
    for b in range(B):
        mask_b, causal_b = attn_mask, is_causal
        if mask_b is not None and _is_plain_causal(mask_b, b):
            mask_b, causal_b = None, True  # transformers' materialized causal mask: same pairs, faster path
        # causal rows on CPU: unmasked/causal flash calls merged by log-sum-exp
        causal_cpu = mask_b is None and causal_b and q.device.type == "cpu"
        img, snk = image[b], sink[b]
        segments = _segments(img)
        text_rows = (img < 0).nonzero().flatten()
        sinks = snk.nonzero().flatten()
        dense_heads = torch.arange(H, device=q.device) if not segments else (heads_t == Category.DENSE).nonzero().flatten()
        for hs, rows in ((dense_heads, None), (sparse_heads if segments else dense_heads[:0], text_rows)):
            # dense heads: every row; text rows of sparse heads: every key (text queries keep all pairs)
            if hs.numel() == 0 or (rows is not None and rows.numel() == 0):
                continue
            qh, kh, vh = q[b:b + 1, hs], k[b:b + 1, hs // rep], v[b:b + 1, hs // rep]
            if rows is None:
                mask = _base_rows(mask_b, b, hs, None, None, False)
                res = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=None if mask is None else mask[None],
                                                     is_causal=mask_b is None and causal_b, scale=scale)
                out[b, hs] = res[0]
            elif causal_cpu:
                for run in _text_runs(rows, True):  # keys before the run: all visible; the run itself: causal
                    t0, t1 = int(run[0]), int(run[-1]) + 1
                    terms = [_flash(qh[:, :, t0:t1], kh[:, :, t0:t1], vh[:, :, t0:t1], True, scale)]
                    if t0 > 0:
                        terms.append(_flash(qh[:, :, t0:t1], kh[:, :, :t0], vh[:, :, :t0], False, scale))
                    out[b, hs, t0:t1] = _merge(terms)[0]
            else:
                for run in _text_runs(rows, mask_b is None and causal_b):
                    # causal: a text run sees only the keys up to its own end
                    keys = all_keys[: int(run[-1]) + 1] if mask_b is None and causal_b else all_keys
                    mask = _base_rows(mask_b, b, hs, run, None if keys is all_keys else keys, causal_b)
                    res = F.scaled_dot_product_attention(qh[:, :, run], kh[:, :, keys], vh[:, :, keys],
                                                         attn_mask=_4d(mask), scale=scale)
                    out[b, hs[:, None], run[None, :]] = res[0]
        if not segments:
            continue
        for c in sorted(set(heads) - {int(Category.DENSE)}):
            hs = (heads_t == c).nonzero().flatten()
            qh, kh, vh = q[b:b + 1, hs], k[b:b + 1, hs // rep], v[b:b + 1, hs // rep]
            for i, s0, s1 in segments:
                if causal_cpu:
                    out[b, hs, s0:s1] = _segment_causal(qh, kh, vh, c, i, s0, s1, text_rows, sinks, img, snk, scale)[0]
                    continue
                rows = torch.arange(s0, s1, device=q.device)
                parts = [text_rows]
                if c in (Category.INTRA_SINK, Category.SINK):
                    parts.append(sinks[img[sinks] != i])
                parts.append(rows)
                keys = torch.cat(parts)
                if mask_b is None and causal_b:
                    keys = keys[keys < s1]  # later keys are never visible to these rows
                keep = None
                if c == Category.SINK:  # own image: only its sinks and the query itself
                    keep = (img[keys] != i)[None, :] | snk[keys][None, :] | (keys[None, :] == rows[:, None])
                mask = _combine(_base_rows(mask_b, b, hs, rows, keys, causal_b), keep)
                if mask_b is not None:  # drop the keys no row may see (e.g. later or padded tokens)
                    seen = (mask if mask.dtype == torch.bool else mask > float("-inf")).any(dim=(0, 1))
                    keys, mask = keys[seen], mask[..., seen]
                res = F.scaled_dot_product_attention(qh[:, :, s0:s1], kh[:, :, keys], vh[:, :, keys],
                                                     attn_mask=_4d(mask), scale=scale)
                out[b, hs, s0:s1] = res[0]
    return out


@segment_attention.register_fake
def _(q, k, v, attn_mask, image, sink, heads, scale, is_causal):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def default_scale(q: torch.Tensor, scale) -> float:
    return 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
