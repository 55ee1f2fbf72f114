"""Queries at an offset (DESIGN §2): a chunk of query rows [o, S) over keys [0, S) equals rows o.. of the whole
prompt's call and SDPA with the independent reference mask, on both lowerings.

The chunk's mask is what transformers passes a forward that continues a cache: causal, bottom-right aligned
(row i of the chunk is position o + i), with the rows' key padding. Random layouts (images of different sizes,
padding, batch 1-3), random categories, offsets and chunk lengths, boundaries inside images.
"""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import blindsight
from blindsight import BaseMask, Category, Layout, Template, reference_mask
from blindsight.lowering import predicted_work, sparse_attention

from strategies import categories_st, layouts

SCALE = 0.3


def eager_flex():
    """The flex lowering with FlexAttention run eagerly: the BlockMask and mask_mod are what is tested here (a
    compile per shape on CPU would cost seconds per example; tests/masks compiles it)."""
    from torch.nn.attention.flex_attention import flex_attention

    import blindsight.lowering.flex as flex

    return mock.patch.object(flex, "_kernel", lambda device: flex_attention)


def chunk_mask(am: torch.Tensor, o: int, S: int) -> torch.Tensor:
    """bool [B, 1, S - o, S]: key k visible to the row at position o + i when k <= o + i and k is not padding."""
    rows = torch.arange(o, S)[:, None]
    return ((torch.arange(S)[None, :] <= rows)[None] & am.bool()[:, None, :])[:, None]


def check(ids, am, layout, heads, kv_heads, o, lowering, seed=0):
    B, S = ids.shape
    H = len(heads)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, 8, generator=g)
    k, v = (torch.randn(B, kv_heads, S, 8, generator=g) for _ in range(2))
    cats = [int(Category.parse(c)) for c in heads]
    rows = torch.arange(o, S)
    keep = reference_mask(layout, cats, BaseMask(causal=False), rows) & chunk_mask(am, o, S)
    ref = F.scaled_dot_product_attention(q[:, :, o:], k, v, attn_mask=keep, scale=SCALE, enable_gqa=True)
    blindsight.reset_stats()
    got = sparse_attention(q[:, :, o:], k, v, chunk_mask(am, o, S), layout, cats, SCALE, lowering=lowering,
                           only_if_faster=False)
    whole = sparse_attention(q, k, v, chunk_mask(am, 0, S), layout, cats, SCALE, lowering=lowering,
                             only_if_faster=False)
    counted = "sparse_calls" if layout.has_images else "fallback.no_images"
    assert blindsight.stats().get(counted) == 2, blindsight.stats()
    real = keep.any(-1, keepdim=True).expand_as(ref)  # rows with a key (padding rows have none: undefined)
    torch.testing.assert_close(got[real], ref[real], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got[real], whole[:, :, o:][real], atol=2e-5, rtol=2e-5)


heads_st = st.integers(1, 2).flatmap(lambda kv: st.tuples(
    st.just(kv), st.lists(categories_st, min_size=kv * 2, max_size=kv * 2)))


@settings(max_examples=40, deadline=None)
@given(layouts(max_batch=3, max_images=5, min_len=3), heads_st, st.data())
def test_segments_chunk_equals_the_whole_prompts_rows(data, kv_heads, draw):
    ids, am, _, layout = data
    o = draw.draw(st.integers(1, ids.shape[1] - 2), label="offset")  # chunks of 2 .. S-1 rows
    check(ids, am, layout, kv_heads[1], kv_heads[0], o, "segments")


@settings(max_examples=15, deadline=None)
@given(layouts(max_batch=2, max_images=4, min_len=3), heads_st, st.data())
def test_flex_chunk_equals_the_whole_prompts_rows(data, kv_heads, draw):
    ids, am, _, layout = data
    o = draw.draw(st.integers(1, ids.shape[1] - 2), label="offset")
    with eager_flex():
        check(ids, am, layout, kv_heads[1], kv_heads[0], o, "flex")


T = Template((252,), (253,), (250,), 1)


@pytest.mark.parametrize("o", [0, 100, 128, 300, 511])
def test_flex_offsets_around_tiles(o):
    """Offsets before, at and after a query tile boundary (128), chunks ending inside images."""
    layout = Layout.from_spec("text:30,(image:150,text:10)x3,text:32", T)
    ids = torch.zeros(1, layout.seq_len, dtype=torch.long)
    with eager_flex():
        check(ids, torch.ones_like(ids), layout, ["sink", "intra", "dense", "intra_sink"], 2, o, "flex")


def test_compiled_flex_kernel_at_an_offset():
    """The compiled kernel (as the flex lowering runs it) at an offset inside an image."""
    layout = Layout.from_spec("text:20,image:140,text:5,image:90,text:9", T)
    ids = torch.zeros(1, layout.seq_len, dtype=torch.long)
    check(ids, torch.ones_like(ids), layout, ["sink", "intra_sink"], 1, 150, "flex")


def test_cost_model_predicts_the_chunks_work():
    """The cost model counts the chunk's rows: twice the rows, about twice the sparse work; and less than the
    chunk's dense work (its L x S pairs: a masked call computes every block)."""
    layout = Layout.from_spec("text:64,(image:496,text:16)x8,text:64", T)
    S = layout.seq_len
    heads = [Category.parse(c) for c in ("intra", "sink", "intra_sink", "dense")]
    k = torch.zeros(1, 2, S, 32)

    def pairs(L):
        q, mask = torch.zeros(1, 4, L, 32), chunk_mask(torch.ones(1, S), S - L, S)
        sparse, dense = predicted_work(q, k, mask, layout, heads, False, "segments")
        return sparse.small_pairs + sparse.dense_pairs, dense.small_pairs + dense.dense_pairs

    (s1, d1), (s2, d2) = pairs(1024), pairs(2048)
    assert 1.6 < s2 / s1 < 2.4 and 1.9 < d2 / d1 < 2.1
    assert s1 < 0.7 * d1 and s2 < 0.7 * d2
