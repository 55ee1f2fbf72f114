"""Calibration statistics against brute force from full attention maps, planted patterns, decide()."""

import pytest
import torch

import blindsight
from blindsight import BaseMask, Category, Layout, Profile, Template, reference_mask
from blindsight.calibrate import removed_mass
from blindsight.categories import SPARSE_CATEGORIES, decide_categories

from tiny_models import build, layout_of, prompt

QWEN_SAMPLES = [([(4, 4), (2, 4)], [3, 2, 4]), ([(4, 6), (2, 4), (4, 4)], [1, 3, 2, 5]), ([(6, 8)], [2, 2])]


def samples(name="qwen2_vl"):
    return [prompt(name, im, tx, seed=i) for i, (im, tx) in enumerate(QWEN_SAMPLES)]


@pytest.fixture(scope="module")
def qwen():
    return build("qwen2_vl")


def brute_force_recall(model_eager, inp, layout=None):
    """recall_c[l, h] = 1 - (mass on pairs c removes, over image rows) / image rows, from the full maps."""
    layout = layout_of(model_eager, inp) if layout is None else layout
    with torch.no_grad():
        maps = model_eager(**inp, output_attentions=True).attentions  # per layer [B, H, S, S]
    rows = layout.image[0] >= 0
    H = maps[0].shape[1]
    out = torch.zeros(len(maps), H, len(SPARSE_CATEGORIES), dtype=torch.float64)
    for layer, p in enumerate(maps):
        for i, c in enumerate(SPARSE_CATEGORIES):
            keep = reference_mask(layout, [c] * H, BaseMask(causal=False))[0]  # [H, S, S]
            removed = (p[0].double() * ~keep)[:, rows].sum(dim=(1, 2))
            out[layer, :, i] = 1 - removed / rows.sum()
    return out


def test_recall_equals_brute_force_from_attention_maps(qwen):
    """Test 1: the chunked statistic equals the definition applied to the eager model's own attention maps."""
    eager = build("qwen2_vl", attn_implementation="eager")
    eager.load_state_dict(qwen.state_dict())
    data = samples()
    profile = blindsight.calibrate(qwen, data, progress=False)
    got = torch.tensor([p["recall"] for p in profile.scores["prompts"]], dtype=torch.float64)
    want = torch.stack([brute_force_recall(eager, inp) for inp in data])
    assert got.shape == want.shape == (3, 2, 4, 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (want < 0.999).any()  # cross-image attention exists: the statistic is not trivially 1


def planted_logits(layout: Layout, categories, strength=30.0):
    """Additive attention logits whose softmax follows each head's category; DENSE heads look everywhere,
    with extra weight on other images' non-sink tokens."""
    H, S = len(categories), layout.seq_len
    logits = torch.zeros(1, H, S, S)
    img = layout.image[0]
    for h, c in enumerate(categories):
        keep = reference_mask(layout, [c], BaseMask(causal=False))[0, 0]
        logits[0, h] = torch.where(keep, 0.0, -strength)
        if c == Category.INTRA_SINK:  # make the other images' sinks matter
            logits[0, h] += 3.0 * layout.sink[0][None, :].float() * (img[:, None] != img[None, :])
        if c == Category.DENSE:
            logits[0, h] += 3.0 * ((img[:, None] >= 0) & (img[None, :] >= 0) & (img[:, None] != img[None, :]))
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf"))


def test_planted_patterns_are_classified_as_planted():
    """Test 2: heads whose attention follows a category get that category; cross-image heads stay DENSE."""
    t = Template((252,), (253,), (250,), 1)
    layout = Layout.from_spec("text:5,(image:12,text:3)x4,text:4", t)
    cats = [Category.SINK, Category.INTRA, Category.INTRA_SINK, Category.DENSE] * 2
    H, S = len(cats), layout.seq_len
    zeros = torch.zeros(1, H, S, 8)
    removed, rows = removed_mass(zeros, zeros, planted_logits(layout, cats), False, 1.0, layout.image, layout.sink)
    recall = (1 - removed[0] / rows[0]).T  # [H, 3]
    decided = decide_categories(recall[None], 0.95)[0]
    assert decided == cats, (decided, recall)


def test_decide_with_other_thresholds_equals_recalibrating(qwen):
    """Test 3: Profile.decide re-decides from stored statistics exactly as a new calibration would."""
    data = samples()
    loose = blindsight.calibrate(qwen, data, thresholds=0.5, progress=False)
    recall = loose.recall("sink")
    th = float(recall.median())  # splits the heads: some pass, some do not
    strict = blindsight.calibrate(qwen, data, thresholds={"sink": th, "intra": 1.0, "intra_sink": 1.0}, progress=False)
    redecided = loose.decide(thresholds={"sink": th, "intra": 1.0, "intra_sink": 1.0})
    assert redecided.categories == strict.categories
    assert redecided.categories != loose.categories
    assert redecided.calibration["thresholds"]["sink"] == th
    q = loose.decide(quantile=1.0)
    assert torch.equal(q.recall("intra"), torch.stack(
        [torch.tensor(p["recall"])[..., 1] for p in loose.scores["prompts"]]).max(0).values.double())


def test_profile_round_trip_keeps_statistics(qwen, tmp_path):
    p = blindsight.calibrate(qwen, samples(), thresholds=0.6, dense_layers=[1], progress=False)
    assert all(c == Category.DENSE for c in p.categories[1])
    p.save(tmp_path / "p.json")
    q = Profile.load(tmp_path / "p.json")
    assert q.categories == p.categories and torch.equal(q.recall("intra"), p.recall("intra"))
    assert q.decide().categories == p.categories


def test_eager_attention_model_gets_clear_error():
    """Test 6: a model whose attention never reaches SDPA."""
    eager = build("qwen2_vl", attn_implementation="eager")
    with pytest.raises(blindsight.UnsupportedAttentionError, match='attn_implementation="sdpa"'):
        blindsight.calibrate(eager, samples()[:1], progress=False)


def test_hand_made_profile_has_no_statistics():
    p = Profile.uniform("dense", blindsight.ModelInfo("x", 1, 2, 1, 4))
    with pytest.raises(ValueError, match="no calibration statistics"):
        p.decide(thresholds=0.9)


def test_per_layer_thresholds_decide_each_layer_as_its_own(qwen):
    """A list of thresholds, one per layer: layer i is decided as the whole profile would be with entry i."""
    p = blindsight.calibrate(qwen, samples(), progress=False)
    loose, strict = p.decide(thresholds=0.5), p.decide(thresholds=1.0)
    assert loose.categories[1] != strict.categories[1]
    mixed = p.decide(thresholds=[0.5, {"sink": 1.0, "intra": 1.0, "intra_sink": 1.0}])
    assert mixed.categories == (loose.categories[0], strict.categories[1])
    assert isinstance(mixed.calibration["thresholds"], list) and mixed.to_dict()["version"] == 2
    assert mixed.decide().categories == mixed.categories
    # the same entry for every layer is stored as one mapping, in a version-1 file
    same = p.decide(thresholds=[0.5, 0.5])
    assert same.calibration["thresholds"] == loose.calibration["thresholds"] and same.to_dict()["version"] == 1
    with pytest.raises(ValueError, match=r"one entry per layer \(2\), got 3"):
        p.decide(thresholds=[0.5] * 3)
    with pytest.raises(ValueError, match=r"thresholds\[1\]: threshold of sink must be in \[0, 1\], got 2"):
        p.decide(thresholds=[0.5, {"sink": 2}])
