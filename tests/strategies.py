"""Hypothesis strategies: random multi-image prompts, batches with padding, and base masks."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

from blindsight import Layout, Template
from blindsight.masks import BaseMask

TEXT, PAD = 5, 0
DELIMITED = Template((252,), (253,), (250, 251), 1)
PLAIN = Template((), (), (250, 251), 1)  # no delimiters: a segment is a run of one placeholder id
CLOSED = Template((), (253,), (250, 251), 1)  # close only (Pixtral): placeholder runs, each ended by its close
TILED = Template((252,), (252,), (250,), 1, final_part_ids=(251,))  # Idefics3: one id opens, separates, closes
TEMPLATES = [DELIMITED, PLAIN, CLOSED, TILED]
TILE_TAG = 6  # a row/column token inside a tiled image (text id)


def image_ids(draw, template: Template) -> list[int]:
    """One well-formed image of ``template``."""
    n = st.integers(1, 12)
    if template is TILED:
        ids = [252]
        for _ in range(draw(st.integers(0, 3))):  # tiles, then the global image
            ids += [TILE_TAG] + [250] * draw(n) + [TEXT] * draw(st.integers(0, 1)) + [252]
        return ids + [251] + [250] * draw(n) + [252]
    body = [draw(st.sampled_from([250, 251])) for _ in range(draw(st.integers(1, 40)))]
    if template is PLAIN:
        return [body[0]] * len(body)
    if template is CLOSED:
        return body + [253]
    return [252] + body + [253]


@st.composite
def rows(draw, template: Template, max_images=5):
    """One prompt's token ids: text runs and images in random order (images first/last, back to back)."""
    ids = []
    for _ in range(draw(st.integers(0, max_images))):
        ids += [TEXT] * draw(st.sampled_from([0, 0, 1, 3, 16]))
        ids += image_ids(draw, template)
    ids += [TEXT] * draw(st.integers(0 if ids else 1, 20))
    return ids


@st.composite
def layouts(draw, max_batch=3, max_images=5, min_len=1, templates=TEMPLATES):
    """(input_ids [B, S], attention_mask [B, S], template, Layout): rows of different layouts, padded left or right."""
    base = draw(st.sampled_from(templates))
    template = dataclasses.replace(base, sinks_per_image=draw(st.integers(1, 3)))
    batch = [draw(rows(base, max_images)) for _ in range(draw(st.integers(1, max_batch)))]
    S = max(min_len, max(len(r) for r in batch))
    left = draw(st.booleans())
    ids = torch.full((len(batch), S), PAD, dtype=torch.long)
    am = torch.zeros(len(batch), S, dtype=torch.long)
    for i, r in enumerate(batch):
        sl = slice(S - len(r), S) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        am[i, sl] = 1
    return ids, am, template, Layout.from_input_ids(ids, template, am)


@st.composite
def base_masks(draw, layout: Layout, attention_mask: torch.Tensor, num_heads: int, kinds=None):
    """The model's own mask: causal, sliding window, bidirectional image blocks, padding, or a bool tensor."""
    kind = draw(st.sampled_from(kinds or ["causal", "window", "bidirectional", "full", "tensor"]))
    padding = attention_mask.bool() if draw(st.booleans()) else None
    if kind == "tensor":
        B, S = layout.image.shape
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        heads = draw(st.sampled_from([1, num_heads]))
        t = torch.rand(B, heads, S, S, generator=g) < draw(st.sampled_from([0.3, 0.9]))
        t |= torch.tril(torch.ones(S, S, dtype=torch.bool)) & draw(st.booleans())
        return BaseMask.from_tensor(t)
    if kind == "full":
        return BaseMask(causal=False, key_padding=padding)
    window = draw(st.integers(1, 40)) if kind == "window" else None
    groups = layout.image.long() if kind == "bidirectional" or draw(st.booleans()) and kind == "window" else None
    return BaseMask(causal=True, sliding_window=window, bidirectional_groups=groups, key_padding=padding)


categories_st = st.sampled_from(["dense", "intra_sink", "intra", "sink"])
