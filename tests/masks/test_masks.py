"""Properties of the masks, each checked against the dense reference built from the definition."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

from blindsight import Category, stats
from blindsight.masks import (
    BaseMask,
    build_block_mask,
    clear_block_mask_cache,
    generate_blindsight_mask_mod,
    generate_category_mask_mod,
    reference_mask,
)
from blindsight.masks.reference import reference_base_mask

from strategies import base_masks, categories_st, layouts

BLOCKS = st.sampled_from([16, 32, (16, 32), (32, 16), 128])


def head_tensor(categories):
    return torch.tensor([int(Category.parse(c)) for c in categories])


def drawn_mask(data):
    """A drawn layout, head categories and base mask, and the mask_mod's dense mask of them."""
    ids, am, template, layout = data.draw(layouts())
    cats = data.draw(st.lists(categories_st, min_size=1, max_size=6))
    base = data.draw(base_masks(layout, am, len(cats)))
    B, S = layout.image.shape
    mod = generate_blindsight_mask_mod(layout.image, layout.sink, head_tensor(cats), base)
    return layout, cats, base, create_mask(mod, B, len(cats), S, S, "cpu")


@settings(max_examples=150)
@given(data=st.data())
def test_mask_mod_equals_reference(data):
    """Property 1: the per-head mask_mod, evaluated on every (q, kv), equals reference_mask."""
    layout, cats, base, got = drawn_mask(data)
    assert torch.equal(got, reference_mask(layout, cats, base))


@settings(max_examples=60)
@given(data=st.data())
def test_single_category_mask_mods_equal_reference(data):
    """Each category's own mask_mod equals its column of the reference (base = no mask)."""
    ids, am, template, layout = data.draw(layouts())
    cat = data.draw(categories_st)
    B, S = layout.image.shape
    got = create_mask(generate_category_mask_mod(layout.image, layout.sink, cat), B, 1, S, S, "cpu")
    assert torch.equal(got, reference_mask(layout, [cat], BaseMask(causal=False)))


BLOCK_FIELDS = ["kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"]


@settings(max_examples=150)
@given(data=st.data())
def test_layout_block_mask_equals_create_block_mask(data):
    """Property 2: the analytic, layout-built BlockMask equals create_block_mask of the same mask_mod."""
    ids, am, template, layout = data.draw(layouts(max_images=6))
    cats = data.draw(st.lists(categories_st, min_size=1, max_size=6))
    base = data.draw(base_masks(layout, am, len(cats), kinds=["causal", "window", "bidirectional", "full"]))
    block = data.draw(BLOCKS)
    B, S = layout.image.shape
    clear_block_mask_cache()
    ours = build_block_mask(layout, cats, base, block_size=block)
    ref = create_block_mask(ours.mask_mod, B, len(cats), S, S, device="cpu", BLOCK_SIZE=block)
    for name in BLOCK_FIELDS:
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    assert ours.seq_lengths == ref.seq_lengths
    before = stats().get("block_masks_reused", 0)
    again = build_block_mask(layout, cats, base, block_size=block)  # tiles cached per layout
    assert stats().get("block_masks_reused", 0) == before + 1 and torch.equal(again.kv_indices, ours.kv_indices)


@settings(max_examples=60)
@given(data=st.data())
def test_tensor_base_block_mask_is_exact_and_conservative(data):
    """With a tensor base: full tiles are exactly torch's; partial tiles cover every non-empty, non-full tile."""
    ids, am, template, layout = data.draw(layouts())
    cats = data.draw(st.lists(categories_st, min_size=1, max_size=4))
    base = data.draw(base_masks(layout, am, len(cats), kinds=["tensor"]))
    block = data.draw(BLOCKS)
    B, S = layout.image.shape
    ours = build_block_mask(layout, cats, base, block_size=block)
    ref = create_block_mask(ours.mask_mod, B, len(cats), S, S, device="cpu", BLOCK_SIZE=block)
    ours_partial, ours_full = _tiles(ours)
    ref_partial, ref_full = _tiles(ref)
    assert torch.equal(ours_full, ref_full)
    assert bool((ours_partial | ~ref_partial).all())  # every tile torch computes, we compute
    assert not bool((ours_partial & ours_full).any())


def _tiles(bm):
    """(partial, full) bool [B, H, nq, nk] from a BlockMask's ordered indices."""
    def dense(num, idx):
        nk = idx.shape[-1]
        present = torch.arange(nk) < num[..., None].long()
        out = torch.zeros(*idx.shape[:-1], nk + 1, dtype=torch.bool)
        out.scatter_(-1, torch.where(present, idx.long(), nk), True)
        return out[..., :nk]
    return dense(bm.kv_num_blocks, bm.kv_indices), dense(bm.full_kv_num_blocks, bm.full_kv_indices)


@settings(max_examples=100)
@given(data=st.data())
def test_text_query_rows_equal_base(data):
    """Property 4: every row whose query is a text token equals the base mask exactly."""
    layout, cats, base, got = drawn_mask(data)
    B, S = layout.image.shape
    want = reference_base_mask(base, B, S).expand_as(got)
    text_q = (layout.image < 0)[:, None, :, None].expand_as(got)
    assert torch.equal(got[text_q], want[text_q])


S_FLEX = 200  # one sequence length so one compiled kernel serves every example


@pytest.fixture(scope="module")
def compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@settings(max_examples=12)
@given(data=st.data())
def test_flex_attention_equals_sdpa_with_reference(compiled_flex, kv_heads, data):
    """Property 3: compiled flex_attention with the layout-built BlockMask equals SDPA with the reference mask."""
    ids, am, template, layout = data.draw(layouts(max_batch=2, max_images=3, min_len=S_FLEX))
    if layout.batch_size == 1:  # one batch size keeps one compiled kernel
        layout = type(layout)(layout.image.repeat(2, 1), layout.sink.repeat(2, 1))
        am = am.repeat(2, 1)
    H = 4
    cats = data.draw(st.lists(categories_st, min_size=H, max_size=H))
    base = data.draw(base_masks(layout, am, H, kinds=["causal", "tensor"]))
    B, S = layout.image.shape
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    q = torch.randn(B, H, S, 16, generator=g)
    k, v = torch.randn(2, B, kv_heads, S, 16, generator=g)
    bm = build_block_mask(layout, cats, base, block_size=32)
    out = compiled_flex(q, k, v, block_mask=bm, enable_gqa=kv_heads != H)
    mask = reference_mask(layout, cats, base)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != H)
    live = mask.any(-1)  # rows with no key at all are undefined (SDPA: NaN, flex: 0)
    torch.testing.assert_close(out[live], ref[live], atol=1e-5, rtol=1e-5)
    # the sparse result must differ from plain causal attention whenever the mask removes something
    dense = reference_base_mask(base, B, S).expand_as(mask)
    if (dense & ~mask & live[..., None]).any() and not torch.equal(dense, mask):
        full = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=kv_heads != H)
        assert not torch.allclose(out[live], full[live], atol=1e-5)


@settings(max_examples=120)
@given(data=st.data())
def test_segment_lowering_equals_sdpa_with_reference(data):
    """The CPU lowering (SDPA per image segment over gathered keys) equals SDPA with the reference mask,
    for causal calls and for any bool mask, with and without GQA, over random batches of layouts."""
    from blindsight.lowering import segment_attention

    ids, am, template, layout = data.draw(layouts(max_images=4))
    H = data.draw(st.sampled_from([2, 4]))
    kv = data.draw(st.sampled_from([1, H]))
    cats = data.draw(st.lists(categories_st, min_size=H, max_size=H))
    kind = data.draw(st.sampled_from(["is_causal", "tensor", "causal_tensor"]))
    B, S = layout.image.shape
    causal = kind == "is_causal"
    if kind == "tensor":
        base = data.draw(base_masks(layout, am, H, kinds=["tensor"]))
    elif kind == "causal_tensor":  # what transformers materializes: causal, and padding in some rows
        m = torch.ones(S, S, dtype=torch.bool).tril().expand(B, 1, S, S).clone()
        if data.draw(st.booleans()):
            m &= am.bool()[:, None, None, :]
        base = BaseMask.from_tensor(m)
    else:
        base = BaseMask()
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    q = torch.randn(B, H, S, 8, generator=g)
    k, v = torch.randn(2, B, kv, S, 8, generator=g)
    out = segment_attention(q, k, v, None if causal else base.tensor, layout.image, layout.sink,
                            [int(Category.parse(c)) for c in cats], 0.5, causal)
    mask = reference_mask(layout, cats, base)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5, enable_gqa=kv != H)
    live = mask.any(-1)
    torch.testing.assert_close(out[live], ref[live], atol=1e-5, rtol=1e-5)
