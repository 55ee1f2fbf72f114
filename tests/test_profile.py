import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen2VLConfig

from blindsight import Category, ModelInfo, Profile, ProfileFormatError, ProfileMismatchError

INFO = ModelInfo("qwen2_vl", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)


@settings(max_examples=50)
@given(st.lists(st.lists(st.sampled_from(list(Category)), min_size=4, max_size=4), min_size=3, max_size=3),
       st.sampled_from([str, lambda c: c]))
def test_save_load_round_trip(tmp_path_factory, categories, as_name):
    """Property 5: save/load keeps categories, model and calibration metadata."""
    path = tmp_path_factory.mktemp("p") / "profile.json"
    cats = [[as_name(c.json_name) if as_name is str else c for c in layer] for layer in categories]
    p = Profile.from_categories(cats, INFO)
    p.save(path)
    q = Profile.load(path)
    assert q.categories == tuple(tuple(layer) for layer in categories)
    assert q.model == INFO and q.calibration == p.to_dict()["calibration"]
    d = json.loads(path.read_text())
    assert d["format"] == "blindsight-profile" and d["version"] == 1
    assert d["categories"][0][0] in {"dense", "intra_sink", "intra", "sink"}


def test_from_hf_config_reads_text_config():
    cfg = Qwen2VLConfig(text_config=dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64))
    p = Profile.uniform("intra", cfg)
    assert (p.model.num_layers, p.model.num_heads, p.model.num_kv_heads, p.model.head_dim) == (2, 4, 2, 16)
    assert p.model.template["image_open_ids"] == [cfg.vision_start_token_id]
    assert "intra 8 (100%)" in p.summary()


def test_corrupt_json(tmp_path):
    path = tmp_path / "p.json"
    Profile.uniform("dense", INFO).save(path)
    path.write_text(path.read_text()[:-20])
    with pytest.raises(ProfileFormatError, match="corrupt profile, not valid JSON"):
        Profile.load(path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ProfileFormatError, match="corrupt"):
        Profile.load(path)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(version=2), "version 2 is not supported.*upgrade blindsight"),
    (lambda d: d.update(version=0), "version 0 is not supported"),
    (lambda d: d.update(format="something"), "not a BlindSight profile"),
    (lambda d: d["categories"][0].__setitem__(0, "sparse"), "unknown category 'sparse'"),
    (lambda d: d["categories"].pop(), "categories for 2 layers but its model has 3"),
    (lambda d: d["model"].pop("head_dim"), "malformed profile"),
])
def test_bad_files_raise_format_error(tmp_path, mutate, message):
    path = tmp_path / "p.json"
    Profile.uniform("sink", INFO).save(path)
    d = json.loads(path.read_text())
    mutate(d)
    path.write_text(json.dumps(d))
    with pytest.raises(ProfileFormatError, match=message):
        Profile.load(path)


def test_profile_for_another_model_shape():
    p = Profile.uniform("intra", INFO)
    p.check_model(INFO)  # same shape: fine
    other = ModelInfo("gemma3", num_layers=3, num_heads=8, num_kv_heads=2, head_dim=16)
    with pytest.raises(ProfileMismatchError, match="num_heads: profile has 4, model has 8"):
        p.check_model(other)
    with pytest.raises(ProfileMismatchError, match="2 heads but its model has 4"):
        Profile.from_categories([["dense", "dense"]] * 3, INFO)
