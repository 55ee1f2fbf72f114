"""The CPU lowering: exact attention per image segment over gathered keys, on SDPA's fused kernels.

On CPU, Inductor's FlexAttention kernel is several times slower than SDPA's flash kernel even on dense
tiles (DESIGN.md §7), so skipping tiles does not pay. Causal calls (no mask, or an exactly causal bool mask)
take the fast path described at ``_causal_row`` below. Any other call (a bool or float mask), per head category:
- DENSE heads: one SDPA call over all rows, with the call's own mask (the fused kernel);
- text query rows of sparse heads: one SDPA call over all keys (text queries keep every pair);
- the rows of image segment i: one SDPA call over only the keys the category can keep for them: text keys,
  image i's own tokens, and (INTRA_SINK, SINK) the other images' sinks; the call's own mask and the category
  rule restricted to those keys give the exact mask. For a causal call, keys after the segment are dropped.
Softmax is order-free over keys and each row's output is written back in place, so the result is the
same attention (to float rounding) as SDPA with the full mask of DESIGN §2.

It runs inside the custom op ``blindsight::attention`` (:mod:`blindsight.lowering`), so its Python body runs
at run time with the real layout: data-dependent segment sizes need no tracing and no graph depends on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..cache import BoundedCache, tensor_digest
from ..categories import Category
from ..layout import image_segments
from .cost import KernelRates, Work, best_seconds, predicted_seconds

__all__ = ["segment_attention", "segment_work", "segment_bound", "measure_segment_rates", "layout_plan",
           "is_plain_causal", "is_causal_mask"]


def _base_rows(attn_mask, b: int, heads: torch.Tensor, rows, keys, is_causal: bool, o: int = 0):
    """The call's own mask on (rows x keys): bool or float ``[Hc|1, R, K]``, or None for no mask.

    ``rows``/``keys`` None: all of them, without copying the S x S mask. ``rows`` are positions in the sequence;
    the call's queries start at position ``o`` (its mask's row i is position o + i).
    """
    if attn_mask is not None:
        m = attn_mask[b if attn_mask.shape[0] > 1 else 0]
        m = m[heads] if m.shape[0] > 1 else m
        m = m if rows is None else m[:, rows - o]
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


def _flash(q, k, v, causal: bool, scale: float, mask=None):
    """(output, log-sum-exp) of SDPA's fused CPU kernel; ``causal`` aligns query and key starts (top left).

    It reads q/k/v through their strides, so a KV head broadcast to several query heads (stride 0) is free.
    A float ``mask`` is added to the scores; it does not skip work (every key block is computed).
    """
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                          scale=scale)
    return out, lse


# S x S bytes each: the causal mask of the length being run, compared with the masks transformers materializes
_CAUSAL = BoundedCache("lowering.causal_masks", max_entries=1, max_bytes=256 << 20)
_CAUSAL_BLOCK = 1024  # rows per comparison when the S x S causal mask is over the cache's bound
_BYTE_ONES = int.from_bytes(b"\x01" * 8, "little")  # 8 True bools as one int64 word


def _lower_triangle(S: int, device) -> torch.Tensor:
    return _CAUSAL.get_or_build((S, str(device)), lambda: torch.ones(S, S, dtype=torch.bool, device=device).tril())


def _equal_bool(m: torch.Tensor, contiguous: torch.Tensor) -> bool:
    """torch.equal of two bool matrices, compared as int64 words (8 entries each) where ``m``'s layout allows a
    word view: ~8x faster than comparing bools on CPU (1.2 vs 9.3 ms at S = 4096)."""
    if m.is_contiguous() and m.shape[-1] % 8 == 0 and m.storage_offset() % 8 == 0:
        return torch.equal(m.view(torch.int64), contiguous.view(torch.int64))
    return torch.equal(m, contiguous)


def _is_causal_blocked(m: torch.Tensor) -> bool:
    """Is ``m [S, S]`` causal, compared in blocks of rows (memory O(block x S), not S x S): the keys before a block
    all kept, its diagonal block lower triangular, the keys after it all dropped."""
    S, R = m.shape[-1], _CAUSAL_BLOCK
    tri = _lower_triangle(R, m.device)
    words = m.is_contiguous() and S % 8 == 0 and m.storage_offset() % 8 == 0
    w = m.view(torch.int64) if words else m
    unit = 8 if words else 1
    ones = torch.full((), _BYTE_ONES if words else True, dtype=w.dtype, device=m.device)
    zero = torch.zeros((), dtype=w.dtype, device=m.device)
    tri = tri.view(torch.int64) if words else tri
    for r0 in range(0, S, R):
        r1 = min(S, r0 + R)
        a, c = r0 // unit, r1 // unit
        blk = w[r0:r1]
        if a and not torch.equal(blk[:, :a], ones.expand(r1 - r0, a)):
            return False
        if c < w.shape[-1] and not torch.equal(blk[:, c:], zero.expand(r1 - r0, w.shape[-1] - c)):
            return False
        if not torch.equal(blk[:, a:c], tri[:r1 - r0, :c - a]):
            return False
    return True


def is_plain_causal(mask: torch.Tensor, b: int) -> bool:
    """Is row b of a bool mask exactly the causal mask (for every head)? One S x S comparison per call, against
    a cached causal mask up to the cache's bound (16K tokens by default), in blocks of rows beyond it."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-1] != mask.shape[-2]:
        return False
    m = mask[b if mask.shape[0] > 1 else 0]
    S = mask.shape[-1]
    limit = _CAUSAL.max_bytes
    if limit is not None and S * S > limit or _CAUSAL.max_entries == 0:
        return all(_is_causal_blocked(m[h]) for h in range(m.shape[0]))
    tril = _lower_triangle(S, mask.device)
    return all(_equal_bool(m[h], tril) for h in range(m.shape[0]))


def is_offset_causal(mask: torch.Tensor, b: int) -> bool:
    """Is row b of a bool mask ``[B|1, H|1, L, S]`` (L < S) exactly the causal mask of queries at offset S - L
    (every earlier key, then the lower triangle of its own block: what transformers passes a forward that continues
    a cache)?"""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2] >= mask.shape[-1]:
        return False
    m = mask[b if mask.shape[0] > 1 else 0]
    L, S = m.shape[-2:]
    own = m[:, :, S - L:]
    if not bool(m[:, :, :S - L].all()):
        return False
    if _CAUSAL.max_bytes is not None and L * L > _CAUSAL.max_bytes:
        return all(_is_causal_blocked(own[h]) for h in range(own.shape[0]))
    tril = _lower_triangle(L, mask.device)
    return all(torch.equal(own[h], tril) for h in range(own.shape[0]))


def _offset_causal(qh, kh, vh, o: int, scale: float) -> torch.Tensor:
    """Causal attention of queries ``qh [1, h, L, D]`` at offset o over keys ``[1, h|1, o + L, D]``: the keys before
    the chunk unmasked, its own block causal (top-left within it), merged by log-sum-exp."""
    h, D = qh.shape[1], qh.shape[3]
    kk, vv = kh.expand(1, h, -1, D), vh.expand(1, h, -1, vh.shape[-1])
    o1, l1 = _flash(qh, kk[:, :, :o], vv[:, :, :o], False, scale)
    o2, l2 = _flash(qh, kk[:, :, o:], vv[:, :, o:], True, scale)
    return _merge(o1, l1, o2, l2).to(qh.dtype)


def is_causal_mask(mask: torch.Tensor) -> bool:
    """Is a bool mask exactly the causal mask in every batch row (transformers' materialized causal mask)?"""
    return all(is_plain_causal(mask, b) for b in range(mask.shape[0]))


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


# ---- the causal fast path ----------------------------------------------------------------------------
# A causal call (no mask, or an exactly causal bool mask) on CPU, per batch row. Every row's kept keys
# outside its own image form a *prefix* of one sorted key list: text rows keep all positions up to
# themselves; image rows keep the text (INTRA) or text + sinks (INTRA_SINK, SINK) before their segment.
# - Text rows (the same in every sparse category) run as a few flash calls over row chunks, each over keys
#   [0, n(last row)), with a float mask for the rows that keep fewer keys.
# - Image rows run segment-batched: the segments of a run of equal-length segments are the batch dimension
#   (a strided view of q, no copy), each with its own key list [prefix keys ; own segment keys] (a small
#   gather) and a float mask (prefix length per segment, causal own block). The own block is split into
#   parts of ~128 rows, each over own keys up to its end, so the upper triangle costs ~1/P of the block.
#   SINK keeps only its own sinks and itself: [prefix ; own sinks], and the own key merged by log-sum-exp.
# Row chunks and segment chunks trade wasted (masked) pairs for fewer calls: _chunks picks them by an
# estimated cost. All of it depends on the layout only, so it is computed once per layout (every layer
# reuses it). Results are written into the output through strided views.

_CALL_COST = 48 * 1024  # one more flash call costs about as much time as this many (rows x keys) pairs
_UNMASKED_MIN_KEYS = 512  # text rows: a chunk's keys kept by every row run unmasked from this many on
_MASK_BUDGET = 1 << 25  # float mask elements a layout's plan may keep (128 MiB in float32); beyond: per call


def _own_parts(L: int, segments: int) -> int:
    """Parts of an own block of L rows: each part computes its own keys up to its last row, so P parts waste
    ~L^2 / 2P pairs per segment (the parts' upper triangles) and add P calls shared by the run's segments:
    P = L * sqrt(segments / (2 * _CALL_COST)) minimises the sum. At most one part per 32 rows (the kernel's
    smallest query block)."""
    return max(1, min(-(-L // 32), round(L * math.sqrt(segments / (2 * _CALL_COST)))))


def _chunks(counts: list[int], n: list[int], cost=lambda rows, keys: rows * keys) -> list[tuple[int, int]]:
    """Split steps (``counts[i]`` rows keeping ``n[i]`` keys, n non-decreasing) into chunks ``(lo, hi)`` of steps.

    A chunk costs ``cost(rows, keys of its last step)`` (the pairs one flash call computes, gaps included)
    + _CALL_COST; exact dynamic programming.
    """
    ends = [0]
    for c in counts:
        ends.append(ends[-1] + c)
    best, choice = [0.0], [0]
    for j in range(1, len(n) + 1):
        c, i = min((best[i] + cost(ends[j] - ends[i], n[j - 1]) + _CALL_COST, i) for i in range(j))
        best.append(c)
        choice.append(i)
    out, j = [], len(n)
    while j > 0:
        out.append((choice[j], j))
        j = choice[j]
    return out[::-1]


def _flash_cost(heads: int):
    """Time of one flash call over (rows x keys) for ``heads`` heads, in pairs of the large-block kernel.

    The CPU kernel splits the rows into blocks of 32 (< 192 rows), 64 (< 768) or 256, ~20/18/17 ns per pair
    on this machine, and spreads (head, row block) items over the threads: few items leave a core idle.
    """
    threads = torch.get_num_threads()

    def cost(rows: int, keys: int) -> float:
        split, rate = (32, 1.2) if rows < 192 else (64, 1.07) if rows < 768 else (256, 1.0)
        items = heads * -(-rows // split)
        return -(-items // threads) * threads * min(split, rows) * keys * rate / heads
    return cost


@dataclass(frozen=True)
class _TextChunk:
    """Text rows ``[r0, r1)`` (indices into the text positions) over keys ``[split, nk)``, masked where a row keeps
    fewer; ``split`` > 0: the keys before it, which every row keeps, run unmasked in a call of their own."""

    r0: int
    r1: int
    split: int
    nk: int
    masked: bool


@dataclass(frozen=True)
class _Chunk:
    """Segments ``[lo, hi)`` of a run in one batched call per part, over the first ``nk`` keys of their category's
    key list (segment i keeps ``prefix[i]`` of them) and their own keys; ``calls``: (row lo, row hi, keys)."""

    lo: int
    hi: int
    nk: int
    prefix: tuple[int, ...]
    calls: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class _SegmentRun:
    L: int  # segment length
    sinks: int  # own sinks per segment (its first tokens)
    starts: tuple[int, ...]  # segment start positions
    chunks: dict  # category -> tuple[_Chunk, ...]


@dataclass(frozen=True)
class _Plan:
    """What the fast path does for one batch row's layout: integers and O(S) key lists, no masks, so the cost
    model can read it for a call it then runs dense; what a sparse run adds is :class:`_RunTensors`."""

    text_rows: torch.Tensor  # text positions
    keys: dict  # category -> sorted key positions outside images that it keeps (text, or text + sinks)
    runs: tuple[_SegmentRun, ...]
    key: tuple | None  # its cache key (None: built uncached)


@dataclass(frozen=True)
class _RunTensors:
    """The gather positions and float masks of a plan's segment chunks, keyed (run, category, chunk); masks are
    left out beyond ``_MASK_BUDGET`` (then built per call)."""

    index: dict
    masks: dict


# Plans, their text chunks and their run tensors, per layout: one layout serves every layer of a forward.
# Bounded (a server sees a new layout at every request): see blindsight.cache.
_PLANS = BoundedCache("lowering.segment_plans", max_entries=256, max_bytes=512 << 20)


def _text_chunks(plan: _Plan, heads: int) -> tuple[_TextChunk, ...]:
    """The text rows' chunks for calls of ``heads`` heads (the best chunks depend on it)."""
    if plan.key is None:
        return _build_text_chunks(plan.text_rows, heads)
    return _PLANS.get_or_build(("text", plan.key, heads), lambda: _build_text_chunks(plan.text_rows, heads))


def _build_text_chunks(text: torch.Tensor, heads: int) -> tuple[_TextChunk, ...]:
    # a text run's rows differ by a few keys: steps of whole runs, the run's own triangle masked
    breaks = [0] + (((text[1:] - text[:-1]) != 1).nonzero().flatten() + 1).tolist() + [text.numel()]
    counts = [b - a for a, b in zip(breaks, breaks[1:])]
    n = [int(text[b - 1]) + 1 for b in breaks[1:]]
    chunks = []
    for lo, hi in _chunks(counts, n, _flash_cost(heads)):
        r0, r1, nk = breaks[lo], breaks[hi], n[hi - 1]
        first = int(text[r0])  # rows are sorted: the first keeps the fewest keys, [0, first]
        masked = first < nk - 1
        # every row keeps the keys before the chunk's first row: those run unmasked, in a call of their own
        split = first if masked and first >= _UNMASKED_MIN_KEYS else 0
        chunks.append(_TextChunk(r0, r1, split, nk, masked))
    return tuple(chunks)


def _text_masks(plan: _Plan, chunks: tuple[_TextChunk, ...], heads: int, dtype) -> tuple:
    """Float masks ``[rows, nk - split]`` of the masked text chunks (None for the others)."""
    def build():
        text, out = plan.text_rows, []
        for ch in chunks:
            if not ch.masked:
                out.append(None)
                continue
            keep = torch.arange(ch.split, ch.nk, device=text.device)[None, :] <= text[ch.r0:ch.r1, None]
            out.append(torch.zeros(keep.shape, dtype=dtype, device=text.device).masked_fill_(~keep, float("-inf")))
        return tuple(out)
    return build() if plan.key is None else _PLANS.get_or_build(("text_masks", plan.key, heads, dtype), build)


def _plan(image_of: torch.Tensor, is_sink: torch.Tensor, cats: tuple, key: tuple | None = None) -> _Plan | None:
    """The layout's plan, or None when sinks are not the first tokens of their segment (general path)."""
    text = (image_of < 0).nonzero().flatten()
    with_sinks = torch.sort(torch.cat([text, is_sink.nonzero().flatten()])).values
    keys = {c: text if c == Category.INTRA else with_sinks for c in cats}
    groups: list = []  # [L, sinks, starts] of runs of equal segments
    for _, s0, s1 in image_segments(image_of):
        ns = int(is_sink[s0:s1].sum())
        if not bool(is_sink[s0:s0 + ns].all()):
            return None
        if groups and groups[-1][0] == s1 - s0 and groups[-1][1] == ns:
            groups[-1][2].append(s0)
        else:
            groups.append([s1 - s0, ns, [s0]])
    runs = []
    for L, ns, starts in groups:
        chunks = {}
        for c in cats:
            n = torch.searchsorted(keys[c], torch.tensor(starts, device=image_of.device)).tolist()  # keys before
            own = ns if c == Category.SINK else L  # SINK: its own sinks (and its own key, merged later)
            P = 1 if c == Category.SINK else _own_parts(L, len(starts))
            height = 32 * -(-L // (32 * P))  # whole query blocks of the kernel
            parts = [(r, min(L, r + height)) for r in range(0, L, height)]
            extra_calls = (len(parts) - 1) * _CALL_COST  # a chunk makes one call per part

            def cost(rows, keys, extra=extra_calls):
                return rows * keys + extra

            # a part's rows never keep own keys after its last row: left out of its call
            chunks[c] = tuple(
                _Chunk(lo, hi, n[hi - 1], tuple(n[lo:hi]),
                       tuple((r0, r1, n[hi - 1] + (own if c == Category.SINK else r1)) for r0, r1 in parts))
                for lo, hi in _chunks([L] * len(n), n, cost))
        runs.append(_SegmentRun(L, ns, tuple(starts), chunks))
    return _Plan(text, keys, tuple(runs), key)


def _run_tensors(plan: _Plan, dtype) -> _RunTensors:
    """Gather positions of every chunk, and its float mask while all of them fit in ``_MASK_BUDGET`` elements."""
    device = plan.text_rows.device
    index, elements = {}, 0
    for r, run in enumerate(plan.runs):
        starts = torch.tensor(run.starts, device=device)
        for c, chunks in run.chunks.items():
            own = run.sinks if c == Category.SINK else run.L
            for i, ch in enumerate(chunks):
                m = ch.hi - ch.lo
                own_keys = starts[ch.lo:ch.hi, None] + torch.arange(own, device=device)
                index[r, c, i] = torch.cat([plan.keys[c][:ch.nk].expand(m, ch.nk), own_keys], 1)
                elements += m * run.L * (ch.nk + own)
    masks = {}
    if elements <= _MASK_BUDGET:  # else each call builds its chunk's mask (long images: O(L^2) each)
        for r, c, i in index:
            run = plan.runs[r]
            masks[r, c, i] = _chunk_mask(run.chunks[c][i], run, c, dtype, device)
    return _RunTensors(index, masks)


def _chunk_mask(ch: _Chunk, run: _SegmentRun, c: int, dtype, device) -> torch.Tensor:
    """Float mask ``[m, 1, L, nk + own]`` of a segment chunk: each segment's prefix keys, then own keys, causal."""
    m, L = ch.hi - ch.lo, run.L
    own = run.sinks if c == Category.SINK else L
    kept = torch.arange(ch.nk, device=device)[None, :] < torch.tensor(ch.prefix, device=device)[:, None]
    tri = torch.arange(own, device=device)[None, :] <= torch.arange(L, device=device)[:, None]
    keep = torch.cat([kept[:, None, :].expand(m, L, ch.nk), tri.expand(m, L, own)], -1)
    return torch.where(keep, 0.0, float("-inf")).to(dtype)[:, None]


def _cached_plan(image_of: torch.Tensor, is_sink: torch.Tensor, cats: tuple) -> _Plan | None:
    """The plan of this row's layout, from the cache (keyed by the layout's content)."""
    key = ("plan", tensor_digest(image_of), tensor_digest(is_sink), cats)
    return _PLANS.get_or_build(key, lambda: _plan(image_of, is_sink, cats, key))


def _cached_run_tensors(plan: _Plan, dtype) -> _RunTensors:
    return _PLANS.get_or_build(("tensors", plan.key, dtype), lambda: _run_tensors(plan, dtype))


def layout_plan(image_of: torch.Tensor, is_sink: torch.Tensor, heads: list[int], rep: int, dtype):
    """The fast path's whole per-layout work for one batch row, uncached (what a new prompt layout costs): the
    plan, its run tensors and the text rows' chunks and masks per head count; None for the general path."""
    cats = tuple(sorted(set(heads) - {int(Category.DENSE)}))
    plan = _plan(image_of, is_sink, cats) if cats else None
    if plan is None:
        return None
    text = {}
    if plan.text_rows.numel():
        sparse = [int(c != Category.DENSE) for c in heads]
        for h0, h1, _ in _head_groups(sparse, rep, True):
            if sparse[h0]:
                chunks = _text_chunks(plan, h1 - h0)
                text[h1 - h0] = (chunks, _text_masks(plan, chunks, h1 - h0, dtype))
    return plan, _run_tensors(plan, dtype), text


def _head_groups(heads: list[int], rep: int, same_category: bool) -> list[tuple[int, int, int]]:
    """(first head, end head, KV head): maximal runs of consecutive heads on one KV head (and category)."""
    groups = []
    for h, c in enumerate(heads):
        g = groups[-1] if groups else None
        if g and g[1] == h and g[2] == h // rep and (not same_category or heads[g[0]] == c):
            groups[-1] = (g[0], h + 1, g[2])
        else:
            groups.append((h, h + 1, h // rep))
    return groups


def _segment_view(x: torch.Tensor, starts: list[int], L: int) -> torch.Tensor | None:
    """``[n, h, L, D]`` strided view of the blocks ``x[:, s:s+L]`` of ``x [h, S, D]``, if evenly spaced."""
    n = len(starts)
    step = starts[1] - starts[0] if n > 1 else L
    if step < L or any(b - a != step for a, b in zip(starts, starts[1:])):
        return None
    sh, ss, sd = x.stride()
    return x.as_strided((n, x.shape[0], L, x.shape[2]), (step * ss, sh, ss, sd), x.storage_offset() + starts[0] * ss)


def _segments_of(x, starts, L):
    view = _segment_view(x, starts, L)
    return view if view is not None else torch.stack([x[:, s:s + L] for s in starts])


def _write_segments(dst, starts, L, r0, r1, src) -> None:
    view = _segment_view(dst, starts, L)
    if view is not None:
        view[:, :, r0:r1].copy_(src)
    else:
        for i, s in enumerate(starts):
            dst[:, s + r0:s + r1].copy_(src[i])


def _image_rows(qh, kk, vv, dst, c: int, plan: _Plan, tensors: _RunTensors, scale: float) -> None:
    """Image rows of heads ``qh [h, S, D]`` (category c, one KV head ``kk``/``vv [S, D]``), written into ``dst``."""
    h, _, D = qh.shape
    for r, run in enumerate(plan.runs):
        L, ns = run.L, run.sinks
        for i, ch in enumerate(run.chunks[c]):
            starts, m = run.starts[ch.lo:ch.hi], ch.hi - ch.lo
            # index_select over the flat index: several times faster than advanced indexing on CPU
            flat = tensors.index[r, c, i].flatten()
            ks = kk.index_select(0, flat).view(m, -1, kk.shape[-1])
            vs = vv.index_select(0, flat).view(m, -1, vv.shape[-1])
            qs = _segments_of(qh, starts, L)
            mask = tensors.masks.get((r, c, i))
            mask = mask if mask is not None else _chunk_mask(ch, run, c, qh.dtype, qh.device)
            for r0, r1, nk in ch.calls:
                o, lse = _flash(qs[:, :, r0:r1], ks[:, None, :nk].expand(m, h, nk, D),
                                vs[:, None, :nk].expand(m, h, nk, vv.shape[-1]), False, scale, mask[:, :, r0:r1, :nk])
                if c == Category.SINK:  # its one call holds every row (r0, r1 = 0, L)
                    o = _with_own_key(o, lse, qs, kk, vv, starts, L, ns, scale)
                _write_segments(dst, starts, L, r0, r1, o)


def _with_own_key(o, lse, qs, kk, vv, starts, L: int, ns: int, scale: float) -> torch.Tensor:
    """SINK rows' output ``o`` (with its log-sum-exp) over their other keys, merged with each row's own key,
    unless that key is a sink (among the other keys already). The own key's score and the merge are in float32:
    in bf16 the score's rounding alone (~0.4% of a logit) would move the weights by more than dense SDPA's own
    rounding does."""
    own_k, own_v = _segments_of(kk[None], starts, L), _segments_of(vv[None], starts, L)
    score = torch.linalg.vecdot(qs.float(), own_k.float()).mul_(scale)
    score[:, :, :ns] = float("-inf")
    return _merge(o, lse, own_v, score)


def _text_rows(qh, kk, vv, dst, rows: torch.Tensor, chunks: tuple[_TextChunk, ...], masks: tuple,
               scale: float) -> None:
    h, _, D = qh.shape
    qr = qh[:, rows]
    outs = []
    for ch, mask in zip(chunks, masks):
        r0, r1, split, nk = ch.r0, ch.r1, ch.split, ch.nk
        o, lse = _flash(qr[None, :, r0:r1], kk[None, None, split:nk].expand(1, h, nk - split, D),
                        vv[None, None, split:nk].expand(1, h, nk - split, vv.shape[-1]), False, scale,
                        None if mask is None else mask[None, None])
        if split:  # the keys every row keeps, unmasked (the float mask costs ~13% of a call's time on CPU)
            o0, lse0 = _flash(qr[None, :, r0:r1], kk[None, None, :split].expand(1, h, split, D),
                              vv[None, None, :split].expand(1, h, split, vv.shape[-1]), False, scale)
            o = _merge(o0, lse0, o, lse).to(qh.dtype)
        outs.append(o[0])
    dst[:, rows] = torch.cat(outs, 1) if len(outs) > 1 else outs[0]


def _merge(o1, lse1, o2, lse2) -> torch.Tensor:
    """Softmax over the union of two disjoint key sets from each set's (output, log-sum-exp), in float32: the second
    set's share of the weight is exp(lse2) / (exp(lse1) + exp(lse2)) = sigmoid(lse2 - lse1), and one lerp mixes
    the outputs (one pass over them)."""
    return torch.lerp(o1.float(), o2.float(), torch.sigmoid(lse2.float() - lse1.float()).unsqueeze(-1))


_BALANCE_MIN_ROWS = 2048  # below this a causal call is cheap enough that one more call and a merge do not pay


def _causal_heads(qh, kk, vv, dst, scale: float) -> None:
    """Causal attention of heads ``qh [h, S, D]`` on one KV head ``kk``/``vv [S, D]``, into ``dst``, balanced.

    The CPU kernel hands each thread one contiguous range of its (batch, head, row block) items. A causal
    head's row blocks grow in cost, so when the heads do not divide among the threads, the thread with the
    last rows does most of the work (1 head on 2 threads: 3/4 of it, 1.5x the balanced time). So the rows are
    cut into P pieces with h * P a multiple of the threads: every piece's own triangle in one call (the
    pieces are the batch of a strided view: whole triangles per thread), and each later piece's rectangle
    over the keys before it (uniform work), merged by log-sum-exp. The same pairs as one causal call.
    """
    h, S, D = qh.shape
    threads = torch.get_num_threads()
    P = threads // math.gcd(h, threads)
    if P == 1 or S < max(_BALANCE_MIN_ROWS, 2 * P):
        o, _ = _flash(qh[None], kk[None, None].expand(1, h, S, D), vv[None, None].expand(1, h, S, -1), True, scale)
        dst.copy_(o[0])
        return
    step = S // P
    L = S - (P - 1) * step  # the last piece takes the remainder; earlier pieces overlap the next by L - step rows
    starts = [i * step for i in range(P)]
    qs = _strided_pieces(qh, step, L)
    ks = _strided_pieces(kk[None], step, L).expand(P, h, L, D)
    vs = _strided_pieces(vv[None], step, L).expand(P, h, L, vv.shape[-1])
    o_own, lse_own = _flash(qs, ks, vs, True, scale)
    dst[:, :L].copy_(o_own[0])
    for i, s in enumerate(starts[1:], 1):
        o, lse = _flash(qs[i:i + 1], kk[None, None, :s].expand(1, h, s, D), vv[None, None, :s].expand(1, h, s, -1),
                        False, scale)
        dst[:, s:s + L].copy_(_merge(o_own[i], lse_own[i], o[0], lse[0]))


def _strided_pieces(x: torch.Tensor, step: int, L: int) -> torch.Tensor:
    """``[P, h, L, D]`` view of ``x [h, S, D]``: rows ``[i * step, i * step + L)`` for each piece i (may overlap)."""
    h, S, D = x.shape
    P = (S - L) // step + 1
    sh, ss, sd = x.stride()
    return x.as_strided((P, h, L, D), (step * ss, sh, ss, sd), x.storage_offset())


def _causal_row(q, k, v, out, b, image_of, is_sink, heads: list[int], rep: int, scale: float) -> bool:
    """Causal attention of batch row b, every head, written into ``out``; False if the layout needs the general path."""
    cats = tuple(sorted(set(heads) - {int(Category.DENSE)}))
    has_images = bool((image_of >= 0).any())
    plan = _cached_plan(image_of, is_sink, cats) if cats and has_images else None
    if cats and has_images and plan is None:
        return False
    tensors = _cached_run_tensors(plan, q.dtype) if plan is not None else None
    if plan is None:
        heads = [int(Category.DENSE)] * len(heads)
    for h0, h1, g in _head_groups(heads, rep, True):
        c = heads[h0]
        qh, kk, vv, dst = q[b, h0:h1], k[b, g], v[b, g], out[b, h0:h1]
        if c == Category.DENSE:
            _causal_heads(qh, kk, vv, dst, scale)
        else:
            _image_rows(qh, kk, vv, dst, c, plan, tensors, scale)
    if plan is not None and plan.text_rows.numel():  # text rows keep every earlier key, in every category
        sparse = [int(c != Category.DENSE) for c in heads]
        for h0, h1, g in _head_groups(sparse, rep, True):
            if sparse[h0]:
                chunks = _text_chunks(plan, h1 - h0)
                masks = _text_masks(plan, chunks, h1 - h0, q.dtype)
                _text_rows(q[b, h0:h1], k[b, g], v[b, g], out[b, h0:h1], plan.text_rows, chunks, masks, scale)
    return True


# ---- the work account (for the cost model, blindsight.lowering.cost) --------------------------------


def _threads_used(items: int) -> float:
    """The fraction of the threads' time a call of ``items`` equal work items keeps busy (static split)."""
    threads = torch.get_num_threads()
    return items / (-(-items // threads) * threads)


def _small_call(m: int, h: int, rows: int, keys: int) -> Work:
    """One call of ``m`` x ``h`` (rows x keys) blocks, its pairs scaled up by the threads it leaves idle."""
    split = 32 if rows < 192 else 64 if rows < 768 else 256  # the CPU kernel's query block
    return Work(small_pairs=m * h * rows * keys / _threads_used(m * h * -(-rows // split)), calls=1)


def _causal_pairs(S: int) -> int:
    """Pairs the CPU kernel computes for one causal head of S rows: each query block up to its last row."""
    split = 32 if S < 192 else 64 if S < 768 else 256
    return sum(min(split, S - m) * min(m + split, S) for m in range(0, S, split))


def _dense_heads_work(h: int, S: int) -> Work:
    """What :func:`_causal_heads` (or one causal SDPA call) computes, in one call or P balanced pieces."""
    pieces = torch.get_num_threads() // math.gcd(h, torch.get_num_threads())
    return Work(dense_pairs=h * _causal_pairs(S), calls=pieces if S >= max(_BALANCE_MIN_ROWS, 2 * pieces) else 1)


def _causal_work(plan: _Plan, heads: list[int], rep: int, S: int) -> Work:
    work = Work()
    for h0, h1, _ in _head_groups(heads, rep, True):
        c, h = heads[h0], h1 - h0
        if c == Category.DENSE:
            work += _dense_heads_work(h, S)
            continue
        for run in plan.runs:
            for ch in run.chunks[c]:
                for r0, r1, nk in ch.calls:
                    work += _small_call(ch.hi - ch.lo, h, r1 - r0, nk)
    sparse = [int(c != Category.DENSE) for c in heads]
    for h0, h1, _ in _head_groups(sparse, rep, True):
        if sparse[h0] and plan.text_rows.numel():
            for ch in _text_chunks(plan, h1 - h0):
                work += _small_call(1, h1 - h0, ch.r1 - ch.r0, ch.nk - ch.split)
                if ch.split:
                    work += _small_call(1, h1 - h0, ch.r1 - ch.r0, ch.split)
    return work


def _general_work(image_of: torch.Tensor, is_sink: torch.Tensor, heads: list[int], causal: bool, L: int) -> Work:
    """The general path's calls (a mask, sinks that do not open their segment, or the last L rows of the
    sequence: queries at an offset), counted roughly."""
    S = image_of.numel()
    o = S - L
    segments = [(s0, s1) for _, s0, s1 in image_segments(image_of) if s1 > o]
    text, sinks = int((image_of < 0).sum()), int(is_sink.sum())
    text_rows = int((image_of[o:] < 0).sum())
    work = Work()
    n_dense = sum(c == Category.DENSE for c in heads)
    if n_dense:
        work += _dense_heads_work(n_dense, S) if causal else _small_call(1, n_dense, L, S)
    for c in set(heads) - {int(Category.DENSE)}:
        h = sum(x == c for x in heads)
        if text_rows:
            work += _small_call(1, h, text_rows, S)
        for s0, s1 in segments:
            work += _small_call(1, h, s1 - max(s0, o), text + (sinks if c != Category.INTRA else 0) + s1 - s0)
    return work


def segment_bound(B: int, S: int, H: int, kv_heads: int, heads: list[int]) -> tuple[Work, Work]:
    """(lower bound of the sparse work, dense work) of a causal call, from its shape and heads alone (no layout):
    the DENSE heads' pairs, and at least one call per head group for image rows and one for text rows."""
    groups = _head_groups(heads, H // kv_heads, True)
    n_dense = sum(h1 - h0 for h0, h1, _ in groups if heads[h0] == Category.DENSE)
    bound = Work(dense_pairs=B * n_dense * _causal_pairs(S), calls=B * 2 * len(groups))
    return bound, Work(dense_pairs=B * H * _causal_pairs(S), calls=B)


def segment_work(q, k, attn_mask, image: torch.Tensor, sink: torch.Tensor, heads: list[int],
                 is_causal: bool, rates: KernelRates | None = None) -> tuple[Work, Work]:
    """(sparse, dense) :class:`~blindsight.lowering.cost.Work` of this call: what segment_attention and SDPA compute.

    With ``rates``, a call whose calls alone (one per head group and kind of row, before any pair) would cost
    more than dense returns that lower bound, without building the layout's plan: the short-prompt case.
    """
    B, H, L, _ = q.shape
    S = k.shape[2]
    rep = H // k.shape[1]
    cats = tuple(sorted(set(heads) - {int(Category.DENSE)}))
    sparse, dense = Work(), Work()
    causal = [L == S and (attn_mask is None and is_causal or attn_mask is not None and is_plain_causal(attn_mask, b))
              for b in range(B)]
    if rates is not None and all(causal):
        bound, full = segment_bound(B, S, H, k.shape[1], heads)
        if predicted_seconds(bound, rates) >= predicted_seconds(full, rates):
            return bound, full
    for b in range(B):
        dense += _dense_heads_work(H, S) if causal[b] else _small_call(1, H, L, S)
        image_of, is_sink = image[b], sink[b]
        has_images = bool((image_of >= 0).any())
        plan = _cached_plan(image_of, is_sink, cats) if causal[b] and cats and has_images else None
        if plan is not None:
            sparse += _causal_work(plan, heads, rep, S)
        else:
            sparse += _general_work(image_of, is_sink, heads, causal[b], L)
    return sparse, dense


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
    """SDPA(q, k, v, attn_mask or is_causal, scale) AND the per-head categories ``heads`` (Category values).

    ``q [B, H, L, D]`` may hold fewer rows than the keys ``[B, KV, S, D]``: the last L positions of the sequence
    (queries at an offset, DESIGN §2), with ``image``/``sink`` ``[B, S]`` the layout of the whole sequence. Such a
    call takes the general path, with its mask (an offset call with ``is_causal`` is given its mask by the caller).
    """
    B, H, L, _ = q.shape
    S = k.shape[2]
    o = S - L  # position of the first query row
    rep = H // k.shape[1]
    out = q.new_empty(B, H, L, v.shape[-1])
    heads_t = torch.tensor(heads, device=q.device)
    all_keys = torch.arange(S, device=q.device)
    sparse_heads = (heads_t != Category.DENSE).nonzero().flatten()
    # SDPA's fused CPU kernels need 4-D inputs (3-D ones take the slow math path): keep a batch dim of 1
    for b in range(B):
        mask_b, causal_b = attn_mask, is_causal
        if mask_b is not None and (is_plain_causal(mask_b, b) if o == 0 else
                                   q.device.type == "cpu" and is_offset_causal(mask_b, b)):
            mask_b, causal_b = None, True  # transformers' materialized causal mask: same pairs, faster path
        image_of, is_sink = image[b], sink[b]
        # causal rows on CPU: the fast path (it declines a layout whose sinks do not open their segment)
        if o == 0 and mask_b is None and causal_b and q.device.type == "cpu" and _causal_row(
                q, k, v, out, b, image_of, is_sink, heads, rep, scale):
            continue
        segments = [(i, s0, s1) for i, s0, s1 in image_segments(image_of) if s1 > o]  # with rows in this call
        text_keys = (image_of < 0).nonzero().flatten()
        text_rows = text_keys[text_keys >= o]
        sinks = is_sink.nonzero().flatten()
        dense_heads = (torch.arange(H, device=q.device) if not segments
                       else (heads_t == Category.DENSE).nonzero().flatten())
        for hs, rows in ((dense_heads, None), (sparse_heads if segments else dense_heads[:0], text_rows)):
            # dense heads: every row; text rows of sparse heads: every key (text queries keep all pairs)
            if hs.numel() == 0 or (rows is not None and rows.numel() == 0):
                continue
            qh, kh, vh = q[b:b + 1, hs], k[b:b + 1, hs // rep], v[b:b + 1, hs // rep]
            if rows is None and o and mask_b is None and causal_b:  # causal at an offset: earlier keys + own block
                out[b, hs] = _offset_causal(qh, kh, vh, o, scale)[0]
            elif rows is None:
                mask = _base_rows(mask_b, b, hs, None, None, False)
                res = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=None if mask is None else mask[None],
                                                     is_causal=mask_b is None and causal_b, scale=scale)
                out[b, hs] = res[0]
            else:
                for run in _text_runs(rows, mask_b is None and causal_b):
                    # causal: a text run sees only the keys up to its own end
                    keys = all_keys[: int(run[-1]) + 1] if mask_b is None and causal_b else all_keys
                    mask = _base_rows(mask_b, b, hs, run, None if keys is all_keys else keys, causal_b, o)
                    res = F.scaled_dot_product_attention(qh[:, :, run - o], kh[:, :, keys], vh[:, :, keys],
                                                         attn_mask=_4d(mask), scale=scale)
                    out[b, hs[:, None], (run - o)[None, :]] = res[0]
        if not segments:
            continue
        for c in sorted(set(heads) - {int(Category.DENSE)}):
            hs = (heads_t == c).nonzero().flatten()
            qh, kh, vh = q[b:b + 1, hs], k[b:b + 1, hs // rep], v[b:b + 1, hs // rep]
            for i, s0, s1 in segments:
                r0 = max(s0, o)
                rows = torch.arange(r0, s1, device=q.device)  # positions of this call's rows in segment i
                parts = [text_keys]
                if c in (Category.INTRA_SINK, Category.SINK):
                    parts.append(sinks[image_of[sinks] != i])
                parts.append(torch.arange(s0, s1, device=q.device))  # the whole segment, earlier chunks included
                keys = torch.cat(parts)
                if mask_b is None and causal_b:
                    keys = keys[keys < s1]  # later keys are never visible to these rows
                keep = None
                if c == Category.SINK:  # own image: only its sinks and the query itself
                    keep = (image_of[keys] != i)[None, :] | is_sink[keys][None, :] | (keys[None, :] == rows[:, None])
                mask = _combine(_base_rows(mask_b, b, hs, rows, keys, causal_b, o), keep)
                if mask_b is not None:  # drop the keys no row may see (e.g. later or padded tokens)
                    seen = (mask if mask.dtype == torch.bool else mask > float("-inf")).any(dim=(0, 1))
                    keys, mask = keys[seen], mask[..., seen]
                res = F.scaled_dot_product_attention(qh[:, :, r0 - o:s1 - o], kh[:, :, keys], vh[:, :, keys],
                                                     attn_mask=_4d(mask), scale=scale)
                out[b, hs, r0 - o:s1 - o] = res[0]
    return out


def measure_segment_rates(dtype: torch.dtype, head_dim: int) -> KernelRates:
    """This machine's rates for the segments lowering: the dense kernel's and a masked segment call's seconds per
    pair, and what one more call of the lowering costs beyond its pairs (Python, gathers, masks, copies),
    from timing this lowering on a small prompt (4 heads, one per category, 4 images)."""
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    cpu = torch.device("cpu")

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    S = 1024  # a dense causal call of whole heads, as many as threads (the dense call's kernel, balanced)
    q = rand(1, threads, S, head_dim)
    dense = best_seconds(lambda: _flash(q, q, q, True, 1.0), cpu) / (threads * _causal_pairs(S))
    m, rows, keys = 2 * threads, 256, 512  # a batch of segment-sized calls with a float mask
    qs, ks = rand(m, 1, rows, head_dim), rand(m, 1, keys, head_dim)
    mask = torch.zeros(m, 1, rows, keys, dtype=dtype)
    small = best_seconds(lambda: _flash(qs, ks, ks, False, 1.0, mask), cpu) / (m * rows * keys)
    # the lowering itself on a small prompt: what is left beyond its pairs, per call
    image = torch.full((1, 480), -1)
    for i in range(4):
        image[0, 32 + 104 * i:32 + 104 * i + 96] = i
    sink = torch.zeros_like(image, dtype=torch.bool)
    sink[0, 32 + 104 * torch.arange(4)] = True
    heads = [int(c) for c in Category]
    q, kv = rand(1, len(heads), 480, head_dim), rand(1, 1, 480, head_dim)
    work, _ = segment_work(q, kv, None, image, sink, heads, True)
    run = best_seconds(lambda: segment_attention(q, kv, kv, None, image, sink, heads, 1.0, True), cpu)
    call = max(0.0, run - work.dense_pairs * dense - work.small_pairs * small) / work.calls
    return KernelRates(dense, small, call)

