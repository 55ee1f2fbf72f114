"""FlexAttention ``mask_mod`` factories for the four categories and for the model's own (base) mask.

Each ``generate_*_mask_mod`` returns a pure ``(b, h, q_idx, kv_idx) -> bool`` closure that captures
tensors only (never Python ints or shapes), so one traced kernel serves every layout of the same size.
Final mask = base AND category (DESIGN.md §2): every pair with a text query or a text key is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import and_masks, or_masks

from ..categories import Category

__all__ = [
    "BaseMask",
    "generate_text_pair_mask_mod",
    "generate_same_image_mask_mod",
    "generate_sink_key_mask_mod",
    "generate_diagonal_mask_mod",
    "generate_category_mask_mod",
    "generate_query_offset_mask_mod",
    "generate_head_category_mask_mod",
    "generate_causal_mask_mod",
    "generate_sliding_window_mask_mod",
    "generate_key_padding_mask_mod",
    "generate_bidirectional_mask_mod",
    "generate_tensor_mask_mod",
    "generate_blindsight_mask_mod",
]


def _named(fn, name: str):
    fn.__name__ = name
    return fn


# ---- category building blocks ----------------------------------------------------------------------
def generate_text_pair_mask_mod(image: torch.Tensor):
    """True when the query or the key is text (``image < 0``): such pairs are never removed."""

    def text_pair(b, h, q_idx, kv_idx):
        return (image[b, q_idx] < 0) | (image[b, kv_idx] < 0)

    return text_pair


def generate_same_image_mask_mod(image: torch.Tensor):
    def same_image(b, h, q_idx, kv_idx):
        return image[b, q_idx] == image[b, kv_idx]

    return same_image


def generate_sink_key_mask_mod(sink: torch.Tensor):
    def sink_key(b, h, q_idx, kv_idx):
        return sink[b, kv_idx]

    return sink_key


def generate_diagonal_mask_mod():
    def diagonal(b, h, q_idx, kv_idx):
        return q_idx == kv_idx

    return diagonal


def generate_category_mask_mod(image: torch.Tensor, sink: torch.Tensor, category: Category | str):
    """The mask of one category (without the base mask); ``image``/``sink`` as in :class:`Layout`."""
    category = Category.parse(category)
    if category == Category.DENSE:
        return _named(lambda b, h, q_idx, kv_idx: q_idx >= 0, "dense")
    text = generate_text_pair_mask_mod(image)
    parts = {
        Category.INTRA_SINK: (generate_same_image_mask_mod(image), generate_sink_key_mask_mod(sink)),
        Category.INTRA: (generate_same_image_mask_mod(image),),
        Category.SINK: (generate_sink_key_mask_mod(sink), generate_diagonal_mask_mod()),
    }[category]
    return _named(or_masks(text, *parts), category.json_name)


def generate_head_category_mask_mod(image: torch.Tensor, sink: torch.Tensor, head_categories: torch.Tensor):
    """Per-head category: head h uses ``Category(head_categories[h])``; for a BlockMask with H = query heads.

    One flat expression (the table of DESIGN.md §2) rather than a select over the per-category closures:
    Dynamo traces it in one piece and Inductor fuses it into the kernel.
    """
    def head_category(b, h, q_idx, kv_idx):
        cat = head_categories[h]
        qi, ki = image[b, q_idx], image[b, kv_idx]
        same = qi == ki
        sink_k = sink[b, kv_idx]
        return (
            (qi < 0)
            | (ki < 0)
            | (cat == int(Category.DENSE))
            | ((cat == int(Category.INTRA_SINK)) & (same | sink_k))
            | ((cat == int(Category.INTRA)) & same)
            | ((cat == int(Category.SINK)) & (sink_k | (q_idx == kv_idx)))
        )

    return head_category


# ---- base masks ------------------------------------------------------------------------------------
def generate_causal_mask_mod():
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    return causal


def generate_sliding_window_mask_mod(window: torch.Tensor):
    """Causal sliding window as in transformers: ``q - window < kv <= q``."""

    def sliding_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)

    return sliding_window


def generate_key_padding_mask_mod(key_valid: torch.Tensor):
    """``key_valid[b, kv]``: the 2-D attention_mask (True/1 = real token)."""

    def key_padding(b, h, q_idx, kv_idx):
        return key_valid[b, kv_idx]

    return key_padding


def generate_bidirectional_mask_mod(groups: torch.Tensor):
    """Gemma-3 style: tokens of the same group (``groups >= 0``) see each other in both directions."""

    def bidirectional(b, h, q_idx, kv_idx):
        g = groups[b, q_idx]
        return (g >= 0) & (g == groups[b, kv_idx])

    return bidirectional


def generate_tensor_mask_mod(mask: torch.Tensor):
    """Any boolean mask an SDPA call received, ``[B|1, H|1, Q, KV]`` (True = attend)."""

    def tensor_mask(b, h, q_idx, kv_idx):
        return mask[b, h, q_idx, kv_idx]

    return tensor_mask


@dataclass(frozen=True, eq=False)
class BaseMask:
    """The model's own mask: ``((causal AND window) OR bidirectional) AND key_padding AND tensor``.

    - ``causal``: ``kv <= q``. ``sliding_window`` (int, needs ``causal``): also ``kv > q - window``.
    - ``bidirectional_groups``: int ``[B, S]``, tokens of one group >= 0 see each other (Gemma-3 images).
    - ``key_padding``: bool ``[B, S]``, False on padding keys.
    - ``tensor``: any bool mask ``[B|1, H|1, Q, KV]``, the whole base by itself (``BaseMask.from_tensor``).
    """

    causal: bool = True
    sliding_window: int | None = None
    bidirectional_groups: torch.Tensor | None = None
    key_padding: torch.Tensor | None = None
    tensor: torch.Tensor | None = None

    def __post_init__(self):
        if self.sliding_window is not None:
            if not self.causal:
                raise ValueError("BaseMask: sliding_window needs causal=True")
            if int(self.sliding_window) < 1:
                raise ValueError(f"BaseMask: sliding_window must be >= 1, got {self.sliding_window}")
        if self.tensor is not None:
            if self.tensor.dtype != torch.bool or self.tensor.dim() != 4:
                raise ValueError("BaseMask.tensor must be a bool [B, H, Q, KV] tensor, got "
                                 f"{self.tensor.dtype} {tuple(self.tensor.shape)}")
            if (self.causal or self.sliding_window is not None or self.bidirectional_groups is not None
                    or self.key_padding is not None):
                raise ValueError("BaseMask.tensor is the whole base mask: use BaseMask.from_tensor(mask)")
        if self.key_padding is not None:
            object.__setattr__(self, "key_padding", self.key_padding.bool())

    @classmethod
    def from_tensor(cls, mask: torch.Tensor) -> BaseMask:
        return cls(causal=False, tensor=mask)

    @property
    def is_analytic(self) -> bool:
        """Block masks can be derived from the layout alone (no tensor mask)."""
        return self.tensor is None

    def mask_mod(self, batch_size: int, num_heads: int):
        parts = []
        if self.sliding_window is not None:
            window = torch.tensor(int(self.sliding_window))
            geometry = generate_sliding_window_mask_mod(window)
        elif self.causal:
            geometry = generate_causal_mask_mod()
        else:
            geometry = None
        if self.bidirectional_groups is not None and geometry is not None:
            geometry = or_masks(geometry, generate_bidirectional_mask_mod(self.bidirectional_groups))
        if geometry is not None:
            parts.append(geometry)
        if self.key_padding is not None:
            parts.append(generate_key_padding_mask_mod(self.key_padding))
        if self.tensor is not None:
            t = self.tensor
            parts.append(generate_tensor_mask_mod(t.expand(batch_size, num_heads, *t.shape[-2:])))
        if not parts:
            return _named(lambda b, h, q_idx, kv_idx: q_idx >= 0, "base_none")
        return _named(and_masks(*parts), "base")


def generate_query_offset_mask_mod(mask_mod, offset: torch.Tensor):
    """``mask_mod`` of query ``q_idx + offset``: for queries that are the rows from ``offset`` on of a sequence."""
    def query_offset(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + offset, kv_idx)

    return _named(query_offset, f"{getattr(mask_mod, '__name__', 'mask')}_at_offset")


def generate_blindsight_mask_mod(image: torch.Tensor, sink: torch.Tensor, head_categories: torch.Tensor,
                                 base: BaseMask, q_offset: int = 0):
    """base AND per-head category: the complete mask of one attention call (``image``/``sink``: ``[B, S]``).
    ``q_offset``: the call's queries are rows ``q_offset ...`` of the sequence (its base mask, a tensor, is over
    the call's own rows)."""
    category = generate_head_category_mask_mod(image, sink, head_categories)
    if q_offset:
        category = generate_query_offset_mask_mod(category, torch.tensor(q_offset, device=image.device))
    mod = and_masks(base.mask_mod(image.shape[0], head_categories.shape[0]), category)
    return _named(mod, "blindsight")
