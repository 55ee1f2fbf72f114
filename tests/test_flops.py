"""FLOP counts on small layouts counted by hand, and on random layouts against the dense reference."""

from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen2Config

from blindsight import Category, Layout, ModelInfo, Profile, Template
from blindsight.flops import attention_flops, prefill_flops
from blindsight.masks import reference_mask

from strategies import base_masks, layouts

T = Template((252,), (253,), (250,), 1)
INFO = ModelInfo("test", num_layers=1, num_heads=4, num_kv_heads=1, head_dim=8)


def test_attention_flops_by_hand():
    # text:2, image A (3 tokens: positions 2-4), image B (3 tokens: 5-7); causal, 8 tokens -> 36 pairs.
    layout = Layout.from_spec("text:2,image:3,image:3", T)
    # image-image pairs with k <= q: within A 6, within B 6, B-queries on A-keys 9 (cross).
    # INTRA drops the 9 cross pairs; INTRA_SINK keeps the 3 on A's sink (pos 2): drops 6;
    # SINK keeps image pairs whose key is a sink or q == k: within A: keys 2 -> 3 pairs, diag 3,4 -> 2;
    # within B: 3 + 2; cross: 3 on key 2; kept 13 of 21 image-image pairs -> drops 8.
    p = Profile.from_categories([["dense", "intra_sink", "intra", "sink"]], INFO)
    f = attention_flops(layout, p)
    per_pair = 4 * 8
    assert f.dense == 4 * 36 * per_pair
    assert f.by_category[Category.INTRA]["blindsight"] == (36 - 9) * per_pair
    assert f.by_category[Category.INTRA_SINK]["blindsight"] == (36 - 6) * per_pair
    assert f.by_category[Category.SINK]["blindsight"] == (36 - 8) * per_pair
    assert f.blindsight == (36 + 30 + 27 + 28) * per_pair
    assert abs(f.reduction - (1 - 121 / 144)) < 1e-12


def test_prefill_flops_by_hand():
    layout = Layout.from_spec("text:4,image:4", T)  # 8 tokens
    cfg = Qwen2Config(hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=1,
                      num_hidden_layers=1, vocab_size=100, head_dim=8)
    p = Profile.uniform("intra", INFO)
    f = prefill_flops(layout, p, cfg)
    per_token = 2 * (16 * 32 + 2 * 16 * 8 + 32 * 16 + 3 * 16 * 32)
    assert f.linear == 8 * per_token + 2 * 16 * 100
    assert f.dense == f.linear + f.attention.dense
    assert f.attention.dense == f.attention.blindsight  # one image: nothing to remove
    assert f.reduction == 0


@settings(max_examples=80)
@given(data=st.data())
def test_attention_flops_equal_reference_pair_counts(data):
    ids, am, template, layout = data.draw(layouts())
    base = data.draw(base_masks(layout, am, 1, kinds=["causal", "window", "bidirectional", "full"]))
    cats = data.draw(st.lists(st.sampled_from(list(Category)), min_size=2, max_size=2))
    info = ModelInfo("test", num_layers=2, num_heads=1, num_kv_heads=1, head_dim=4)
    f = attention_flops(layout, Profile.from_categories([[c] for c in cats], info), base)
    kept = sum(int(reference_mask(layout, [c], base).sum()) for c in cats)
    dense = 2 * int(reference_mask(layout, ["dense"], base).sum())
    assert (f.blindsight, f.dense) == (16 * kept, 16 * dense)
