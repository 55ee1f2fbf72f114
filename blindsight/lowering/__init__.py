"""Exact sparse attention of one call, shared by the compiled path and the eager attention-interface path.

``sparse_attention(q, k, v, attn_mask, layout, heads, ...)`` decides per call whether the call can be sparse
(prefill self-attention whose layout matches and has images, no autograd) and runs one of the lowerings
(``LOWERINGS``), or dense SDPA with the reason counted (``blindsight.stats()``). The compiler pass rewrites
each language-model SDPA into the custom op ``blindsight::attention``, which calls it with the layout that
the run time set for this forward (:func:`calls_use`): the op's body runs at run time with real tensors, so
the compiled graph depends neither on the prompt's length nor on where its images are.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..cache import BoundedCache
from ..categories import Category
from ..layout import Layout
from ..stats import count, record_fallback
from .cost import KernelRates, Work, kernel_rates, sparse_pays
from .flex import flex_sparse_attention, flex_work, measure_flex_rates
from .segments import (
    is_causal_mask,
    layout_plan,
    measure_segment_rates,
    segment_attention,
    segment_bound,
    segment_work,
)

__all__ = ["LOWERINGS", "Lowering", "sparse_attention", "dense_attention", "shared_mask", "calls_use",
           "resolve_lowering", "segment_attention", "layout_plan", "flex_sparse_attention", "default_scale",
           "predicted_work", "never_pays"]


@dataclass(frozen=True)
class Lowering:
    """A sparse lowering: how it runs a call, what it computes for one (for the cost model), its kernel rates."""

    run: Callable  # (q, k, v, attn_mask, layout, heads, scale, is_causal, block_size) -> out
    work: Callable  # (q, k, attn_mask, layout, heads, is_causal, block_size, rates) -> (sparse Work, dense Work)
    rates: Callable  # (device, dtype, head_dim) -> KernelRates
    bound: Callable | None = None  # (B, S, H, kv_heads, heads) -> (sparse lower bound, dense) of a causal call


def _segments(q, k, v, attn_mask, layout: Layout, heads, scale, is_causal, block_size):
    return segment_attention(q, k, v, attn_mask, layout.image.to(q.device), layout.sink.to(q.device), heads, scale,
                             is_causal)


def _segments_work(q, k, attn_mask, layout: Layout, heads, is_causal, block_size, rates=None):
    return segment_work(q, k, attn_mask, layout.image.to(q.device), layout.sink.to(q.device), heads, is_causal,
                        rates)


def _segments_rates(device, dtype, head_dim) -> KernelRates:
    return kernel_rates("segments", device, dtype, head_dim, measure_segment_rates)


def _flex_rates(device, dtype, head_dim) -> KernelRates:
    return kernel_rates("flex", device, dtype, head_dim, lambda dt, d: measure_flex_rates(dt, d, device))


# name -> Lowering; "auto" picks per device (resolve_lowering)
LOWERINGS = {"flex": Lowering(flex_sparse_attention, flex_work, _flex_rates),
             "segments": Lowering(_segments, _segments_work, _segments_rates, segment_bound)}


def resolve_lowering(name: str, device: torch.device | str) -> str:
    """``"auto"``: segments on CPU (Inductor's CPU flex kernel is slower than SDPA even on dense tiles), flex
    elsewhere. Raises ValueError for an unknown name."""
    if name == "auto":
        return "segments" if torch.device(device).type == "cpu" else "flex"
    if name not in LOWERINGS:
        raise ValueError(f"unknown lowering {name!r}; expected 'auto' or one of {sorted(LOWERINGS)}")
    return name


def default_scale(q: torch.Tensor, scale) -> float:
    return 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


@dataclass(frozen=True)
class CallLayout:
    """What the run time found for the attention calls it is about to run: a layout, or why there is none;
    or ``resolve(query length, key length) -> (layout, reason)``, asked by each call (calls at an offset need
    the layout of the whole sequence, whose length only the call knows) and remembered per shape."""

    layout: Layout | None
    reason: str | None = None
    warn_always: bool = False
    heads: tuple[int, ...] | None = None  # the running decoder layer's categories, for ops rewritten without
    resolve: Callable | None = None
    resolved: dict = field(default_factory=dict, compare=False)

    def for_call(self, query_len: int, seq_len: int) -> tuple[Layout | None, str | None]:
        if self.resolve is None or self.reason is not None:
            return self.layout, self.reason
        key = (query_len, seq_len)
        if key not in self.resolved:
            self.resolved[key] = self.resolve(query_len, seq_len)
        return self.resolved[key]


_CALL: contextvars.ContextVar[CallLayout | None] = contextvars.ContextVar("blindsight_call_layout", default=None)


@contextlib.contextmanager
def calls_use(layout: Layout | None, reason: str | None = None, warn_always: bool = False,
              heads: tuple[int, ...] | None = None, resolve: Callable | None = None):
    """Attention calls inside the block (``blindsight::attention`` ops) use this layout, or run dense for ``reason``,
    or the layout ``resolve(key length)`` gives; ``heads``: the categories of ops rewritten without their own (a
    graph that holds one decoder layer)."""
    token = _CALL.set(CallLayout(layout, reason, warn_always, heads, resolve))
    try:
        yield
    finally:
        _CALL.reset(token)


def dense_attention(q, k, v, attn_mask, scale, is_causal, dropout_p: float = 0.0) -> torch.Tensor:
    """The call as it was: SDPA (GQA by broadcasting when K/V have fewer heads).

    A bool mask that is exactly causal in every batch row (transformers materializes it under torch.compile,
    where it cannot prove the prompt unpadded) runs as ``is_causal=True``: the same pairs, and the fused kernels
    skip the blocks above the diagonal only then (with a mask they compute every block: 2x the work).
    """
    if attn_mask is not None and q.shape[2] == k.shape[2] and is_causal_mask(attn_mask):
        attn_mask, is_causal = None, True
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def mask_4d(attn_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A mask broadcastable to ``[B, H, L, S]`` (2-D ``[L, S]``, 3-D ``[H|1, L, S]``, key padding ``[B, 1, 1, S]``,
    ...) as the ``[B|1, H|1, L, S]`` view every lowering reads (no copy). Raises as SDPA does for a mask that
    does not broadcast."""
    B, H, L, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if attn_mask.dim() > 4:
        raise RuntimeError(f"attn_mask of {attn_mask.dim()} dimensions: SDPA takes at most 4")
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)) if attn_mask.dim() < 4 else attn_mask
    for size, want in zip(m.shape, (B, H, L, S)):
        if size not in (1, want):
            raise RuntimeError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {(B, H, L, S)}")
    return m.expand(m.shape[0], m.shape[1], L, S)


def why_dense(q, k, v, layout: Layout | None, reason: str | None) -> str | None:
    """Why this call cannot be sparse, or None. Decode comes first: it is exactly dense by definition."""
    if q.shape[2] == 1:
        return "decode"
    if reason is not None:
        return reason
    if layout is None:
        return "no_layout"
    if q.shape[2] > k.shape[2]:
        return "not_self_attention"
    if layout.seq_len != k.shape[2] or layout.batch_size != q.shape[0]:  # the layout of the whole sequence
        return "layout_mismatch"
    if not layout.has_images:
        return "no_images"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "autograd"
    return None


def predicted_work(q, k, attn_mask, layout: Layout, heads, is_causal: bool, lowering: str = "auto",
                   block_size: int = 128) -> tuple[Work, Work]:
    """(sparse, dense) work of a call on a lowering, as the cost model sees it (for benchmarks and tests)."""
    name = resolve_lowering(lowering, q.device)
    return LOWERINGS[name].work(q, k, attn_mask, layout, [int(Category(h)) for h in heads], is_causal, block_size)


# (layout, call shape and heads) -> does sparse pay?: every layer of a forward (and every forward of a prompt
# whose layout is memoized) asks again with the same layout
_DECIDED = BoundedCache("lowering.decisions", max_entries=4096)


def _pays(name: str, q, k, attn_mask, layout: Layout, heads: list[int], is_causal: bool, block_size: int) -> bool:
    """The cost model's decision for this call, once per (layout, lowering, heads, shapes, dtype, mask kind, rates)."""
    impl = LOWERINGS[name]
    rates = impl.rates(q.device, q.dtype, q.shape[-1])
    key = (layout.key, name, tuple(heads), tuple(q.shape), k.shape[1], q.dtype, q.device, is_causal, block_size,
           None if attn_mask is None else (attn_mask.dtype, tuple(attn_mask.shape)), rates)

    def decide():
        sparse, dense = impl.work(q, k, attn_mask, layout, heads, is_causal, block_size, rates)
        return sparse_pays(sparse, dense, rates)
    return _DECIDED.get_or_build(key, decide)


def never_pays(lowering: str, device: torch.device, dtype: torch.dtype, B: int, S: int, H: int, kv_heads: int,
               head_dim: int, heads) -> bool:
    """Is a causal call of this shape certain not to beat dense on ``lowering``, whatever the prompt's layout?
    (Its calls alone cost more than the dense call.) False when the lowering has no such bound."""
    impl = LOWERINGS[resolve_lowering(lowering, device)]
    if impl.bound is None:
        return False
    rates = impl.rates(device, dtype, head_dim)
    bound, dense = impl.bound(B, S, H, kv_heads, [int(Category(h)) for h in heads])
    return not sparse_pays(bound, dense, rates)


def sparse_attention(q, k, v, attn_mask, layout: Layout | None, heads, scale=None, is_causal: bool = False,
                     lowering: str = "auto", block_size: int = 128, reason: str | None = None,
                     warn_always: bool = False, only_if_faster: bool = True) -> torch.Tensor:
    """``SDPA(q, k, v, attn_mask or is_causal, scale)`` AND each query head's category (``heads``), exactly.

    ``q [B, H, S, D]``, ``k``/``v`` ``[B, H or KV heads, S, D]``; ``attn_mask`` bool (True = attend) or additive,
    broadcastable to ``[B, H, S, S]``. A call that cannot be sparse runs dense SDPA and is counted by reason;
    so does one that the cost model predicts would not beat dense (``not_faster``, unless ``only_if_faster``
    is False).
    """
    why = why_dense(q, k, v, layout, reason)
    name = resolve_lowering(lowering, q.device)
    heads = [int(Category(h)) for h in heads]
    if why is None and attn_mask is not None:
        attn_mask = mask_4d(attn_mask, q, k)
    elif why is None and is_causal and q.shape[2] < k.shape[2]:  # SDPA's causal flag is top-left aligned then
        top_left = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        attn_mask, is_causal = top_left[None, None], False
    if why is None and only_if_faster and not _pays(name, q, k, attn_mask, layout, heads, is_causal, block_size):
        why = "not_faster"
    if why is not None:
        record_fallback(why, 1, warn_always)
        return dense_attention(q, k, v, attn_mask, scale, is_causal).contiguous()
    out = LOWERINGS[name].run(q, k, v, attn_mask, layout, heads, default_scale(q, scale), is_causal, block_size)
    count("sparse_calls")
    count(f"lowering.{name}")
    return out.contiguous()


@torch.library.custom_op("blindsight::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                 heads: list[int], scale: float | None, is_causal: bool, lowering: str,
                 block_size: int, only_if_faster: bool) -> torch.Tensor:
    """What each rewritten site calls: :func:`sparse_attention` with the layout the run time set (:func:`calls_use`)."""
    call = _CALL.get() or CallLayout(None, "no_layout")
    layout, reason = call.for_call(q.shape[2], k.shape[2]) if q.shape[2] > 1 else (call.layout, call.reason)
    if not heads:
        heads = list(call.heads or ())
        if not heads and reason is None:
            layout, reason = None, "no_layer"
    if not heads:  # dense for the reason given: any categories do
        heads = [0] * q.shape[1]
    return sparse_attention(q, k, v, attn_mask, layout, heads, scale, is_causal, lowering, block_size, reason,
                            call.warn_always, only_if_faster)


@attention_op.register_fake
def _(q, k, v, attn_mask, heads, scale, is_causal, lowering, block_size, only_if_faster):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("blindsight::shared_mask", mutates_args=())
def shared_mask(mask: torch.Tensor) -> torch.Tensor:
    """The graph's attention mask, materialized once for all its ``blindsight::attention`` ops. Inductor computes
    a mask built from cheap pointwise ops (transformers' causal-and-padding mask) into a buffer of its own for
    each extern op that reads it: one S x S mask per layer, where SDPA nodes would share one."""
    return mask.clone(memory_format=torch.contiguous_format)


@shared_mask.register_fake
def _(mask):
    return torch.empty_like(mask, memory_format=torch.contiguous_format)
