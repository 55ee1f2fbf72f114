"""The CPU lowering (blindsight.lowering.segment_attention) against SDPA with the definition mask (DESIGN §2).

Called directly (eager), so hypothesis can try many layouts fast: causal calls take the fast path (text rows in
chunks, image segments batched by length, own blocks in parts), bool and float masks the general one.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blindsight import BaseMask, Category, Layout, Template, reference_mask
from blindsight.lowering import segment_attention

from strategies import categories_st, layouts

SCALE = 0.3


def _qkv(B, H, KV, S, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g)
    k, v = (torch.randn(B, KV, S, D, generator=g) for _ in range(2))
    return q, k, v


def _check(layout, heads, kv_heads, base=None, mask=None, real=None, seed=0):
    """segment_attention(q, k, v, mask or is_causal) == SDPA with base AND categories (rows in ``real``)."""
    B, S = layout.image.shape
    q, k, v = _qkv(B, len(heads), kv_heads, S, seed=seed)
    cats = [Category.parse(c) for c in heads]
    keep = reference_mask(layout, cats, base if base is not None else BaseMask())
    if mask is not None and mask.dtype != torch.bool:
        full = mask + torch.where(keep, 0.0, float("-inf"))
    else:
        full = keep
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full, scale=SCALE, enable_gqa=True)
    out = segment_attention(q, k, v, mask, layout.image, layout.sink, [int(c) for c in cats], SCALE, mask is None)
    rows = real if real is not None else torch.ones(B, S, dtype=torch.bool)
    torch.testing.assert_close(out.transpose(1, 2)[rows], ref.transpose(1, 2)[rows], atol=2e-5, rtol=2e-5)


heads_st = st.integers(1, 3).flatmap(lambda kv: st.tuples(
    st.just(kv), st.lists(categories_st, min_size=kv * 2, max_size=kv * 2)))


@settings(max_examples=40, deadline=None)
@given(layouts(max_batch=2, max_images=5), heads_st, st.sampled_from(["causal", "causal_bool", "bool", "float"]))
def test_matches_reference(data, kv_heads, kind):
    """Random layouts (1-3 sinks per image, unequal segments, padding left or right, batch 1-2), GQA, every
    category in random head order; is_causal, the exactly-causal bool mask transformers materializes (both
    the fast path), a bool mask with key padding, an additive float mask with biases."""
    ids, am, template, layout = data
    kv, heads = kv_heads
    B, S = ids.shape
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    pad = am.bool()
    if kind == "causal":
        _check(layout, heads, kv)
    elif kind == "causal_bool":
        _check(layout, heads, kv, mask=causal.expand(B, 1, S, S))
    else:
        base = BaseMask(key_padding=pad)
        allowed = causal & pad[:, None, None, :]
        if kind == "bool":
            mask = allowed
        else:
            bias = torch.randn(B, 1, S, S, generator=torch.Generator().manual_seed(S))
            mask = bias.masked_fill(~allowed, float("-inf"))
        _check(layout, heads, kv, base=BaseMask(causal=False, key_padding=pad) if kind == "float" else base,
               mask=mask, real=pad)


T2 = Template((252,), (253,), (250,), 2)


@pytest.mark.parametrize("spec, heads, kv", [
    # long segments: own blocks split in parts; evenly spaced (strided views) and not
    ("text:5,(image:300,text:3)x3,image:200,text:4", ["sink", "intra", "dense", "intra_sink"], 2),
    ("text:4,(image:260,text:5)x3", ["intra_sink", "intra_sink", "sink", "intra"], 1),
    # images back to back, first token an image, last token an image
    ("image:40,image:17,text:2,image:40,image:40", ["intra", "sink", "intra_sink", "dense", "sink", "intra"], 3),
    ("text:7", ["intra", "sink"], 1),  # no image: dense
])
def test_fast_path_shapes(spec, heads, kv):
    _check(Layout.from_spec(spec, T2), heads, kv)


def test_fast_path_reuses_plan_across_layouts():
    """Two layouts of one length, alternating: each call uses its own layout's plan."""
    a = Layout.from_spec("text:8,(image:30,text:4)x3,text:6", T2)
    b = Layout.from_spec("text:8,image:30,text:4,image:60,text:4,image:6,text:4", T2)
    assert a.seq_len == b.seq_len
    for layout in (a, b, a, b):
        _check(layout, ["intra", "sink", "intra_sink", "dense"], 2)


def test_masks_built_per_call_beyond_the_budget(monkeypatch):
    """A layout whose masks exceed the plan's budget builds them per call: same result."""
    import blindsight.lowering.segments as lowering

    monkeypatch.setattr(lowering, "_MASK_BUDGET", 0)
    lowering._PLANS.clear()
    _check(Layout.from_spec("text:5,(image:300,text:3)x3,image:200,text:4", T2),
           ["sink", "intra", "dense", "intra_sink"], 2)


@pytest.mark.parametrize("spec", ["text:5,(image:30,text:3)x3,image:20,text:4", "text:40,image:17,text:9,image:40"])
def test_text_rows_keys_kept_by_every_row_run_unmasked(monkeypatch, spec):
    """Text rows: a chunk's keys before its first row run as an unmasked call merged with the masked rest (here
    from the first key on, and a chunk per text run, so every chunk but the first is split): same result."""
    import blindsight.lowering.segments as lowering

    monkeypatch.setattr(lowering, "_UNMASKED_MIN_KEYS", 1)
    monkeypatch.setattr(lowering, "_CALL_COST", 1)
    lowering._PLANS.clear()
    layout = Layout.from_spec(spec, T2)
    _, _, text = lowering.layout_plan(layout.image[0], layout.sink[0], [int(Category.INTRA)] * 2, 2, torch.float32)
    chunks, _ = text[2]  # 2 heads on one KV head: one call for both
    assert any(chunk.split for chunk in chunks)
    _check(layout, ["intra", "sink", "intra_sink", "dense"], 2)
