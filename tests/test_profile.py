import json

import pytest
import torch
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
    cfg = Qwen2VLConfig(text_config=dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         hidden_size=64))
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
    (lambda d: d.update(version=3), "version 3 is not supported.*upgrade blindsight"),
    (lambda d: d.update(version=2), "version 2 is for per-layer calibration.thresholds"),
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


# ---- strict loading: every malformed field is a ProfileFormatError that names it ("Zero silent wrong answers") -------

TEMPLATE = {"image_open_ids": [252], "image_close_ids": [253], "image_token_ids": [250, 251], "sinks_per_image": 1}


def scored_dict():
    """A saved profile with a template and calibration statistics of the right shape (2 prompts x 3 layers x
    4 heads x 3)."""
    recall = [[[0.99, 0.9, 0.5]] * 4] * 3
    scores = {"statistic": "recall", "categories": ["intra_sink", "intra", "sink"],
              "prompts": [{"sample": i, "row": 0, "image_rows": 10, "recall": recall} for i in range(2)]}
    info = ModelInfo("qwen2_vl", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, template=TEMPLATE)
    return Profile(info, (("dense",) * 4,) * 3, {"quantile": 0.0}, scores).to_dict()


def set_recall(d, value):
    d["scores"]["prompts"][1]["recall"] = [[[0.99, 0.9, 0.5]] * 4] * 3
    d["scores"]["prompts"][1]["recall"][2] = [[0.99, 0.9, 0.5]] * 3 + [[0.99, value, 0.5]]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(version=1.0), r'"version" must be an integer \(1 or 2\), got 1\.0'),
    (lambda d: d.update(version=True), r'"version" must be an integer \(1 or 2\), got True'),
    (lambda d: d["categories"][1].__setitem__(2, 2.7), r"categories\[1\]\[2\]: unknown category 2\.7; expected"),
    (lambda d: d["categories"][0].__setitem__(0, True), r"categories\[0\]\[0\]: unknown category True; expected"),
    (lambda d: d["model"].update(template="qwen"), r"model\.template must be an object"),
    (lambda d: d["model"]["template"].pop("image_token_ids"), r"model\.template\.image_token_ids is missing"),
    (lambda d: d["model"]["template"].update(sinks_per_image=0), r"model\.template\.sinks_per_image must be"),
    (lambda d: d["model"]["template"].update(image_open_ids=["5"]), r"model\.template\.image_open_ids\[0\]"),
    (lambda d: d["model"]["template"].update(image_open_ids=[252, 9]), r"model\.template: .*parallel"),
    (lambda d: d["model"].update(num_kv_heads=True), r"model\.num_kv_heads must be a positive int, got True"),
    (lambda d: d["model"].update(model_type=7), r"model\.model_type must be a string"),
    (lambda d: d["model"].update(heads=4), r"model\.heads is not a model field"),
    (lambda d: d.update(calibration=[["quantile", 0.5]]), r"calibration must be an object"),
    (lambda d: d["calibration"].update(quantile=True), r"calibration\.quantile: quantile must be a number"),
    (lambda d: set_recall(d, 1.5), r"scores\.prompts\[1\]\.recall\[2\]\[3\]\[1\] must be a recall in \[0, 1\], got 1\.5"
     ),
    (lambda d: set_recall(d, float("nan")), r"scores\.prompts\[1\]\.recall\[2\]\[3\]\[1\] must be a recall .*nan"),
    (lambda d: set_recall(d, -0.2), r"recall in \[0, 1\], got -0\.2"),
    (lambda d: d["scores"]["prompts"][0]["recall"].pop(), r"scores\.prompts\[0\]\.recall must be a list of 3 layers"),
    (lambda d: d["scores"]["prompts"][0]["recall"][0].pop(), r"scores\.prompts\[0\]\.recall\[0\] must be a list of 4"),
    (lambda d: d["scores"]["prompts"][0].pop("recall"), r"scores\.prompts\[0\]\.recall is missing"),
    (lambda d: d["scores"].update(categories=["sink", "intra", "intra_sink"]),
     r"scores\.categories must be \['intra_sink', 'intra', 'sink'\]"),
])
def test_malformed_fields_are_named(tmp_path, mutate, message):
    """Item 8: a field of the wrong type, range or shape is refused on loading, naming the field."""
    d = scored_dict()
    path = tmp_path / "p.json"
    mutate(d)
    path.write_text(json.dumps(d))
    with pytest.raises(ProfileFormatError, match=message):
        Profile.load(path)


def test_valid_scored_profile_loads_as_saved(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(scored_dict()))
    p = Profile.load(path)
    assert p.to_dict() == scored_dict()
    assert p.decide(thresholds=0.9).categories == ((Category.INTRA,) * 4,) * 3


def test_deeply_nested_json_is_a_format_error(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"format": "blindsight-profile", "calibration": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(ProfileFormatError, match="nested too deeply"):
        Profile.load(path)


def scored_profile():
    return Profile.from_dict(scored_dict())


@pytest.mark.parametrize("kwargs, message", [
    (dict(dense_layers=[0.5]), r"dense_layers must be layer numbers \(ints\), got 0\.5"),
    (dict(dense_layers=[True]), r"dense_layers must be layer numbers \(ints\), got True"),
    (dict(dense_layers=[3]), r"dense_layers: layer 3 is out of range for 3 layers"),
    (dict(dense_layers=[-1]), r"dense_layers: layer -1 is out of range"),
    (dict(thresholds=True), r"thresholds must be a number in \[0, 1\] or a mapping.*got True"),
    (dict(thresholds=1.5), r"threshold of intra_sink must be in \[0, 1\], got 1\.5"),
    (dict(thresholds=float("nan")), r"threshold of intra_sink must be in \[0, 1\], got nan"),
    (dict(thresholds={"sinks": 0.9}), r"thresholds: unknown category 'sinks'"),
    (dict(thresholds={"sink": True}), r"threshold of sink must be a number, got True"),
    (dict(quantile=1.5), r"quantile must be in \[0, 1\], got 1\.5"),
    (dict(quantile=-0.1), r"quantile must be in \[0, 1\], got -0\.1"),
    (dict(quantile=True), r"quantile must be a number in \[0, 1\], got True"),
])
def test_decide_rejects_bad_arguments(kwargs, message):
    """Item 8: decide() arguments that were silently ignored or coerced are refused, naming the argument."""
    with pytest.raises(ValueError, match=message):
        scored_profile().decide(**kwargs)


def test_category_parse_is_strict():
    assert [Category.parse(x) for x in (Category.SINK, 2, "intra_sink", " DENSE ", 3.0)] == \
        [Category.SINK, Category.INTRA, Category.INTRA_SINK, Category.DENSE, Category.SINK]
    for bad in (True, False, 2.7, 4, -1, None, "sparse"):
        with pytest.raises(ValueError, match="category"):
            Category.parse(bad)


def test_model_info_is_strict():
    with pytest.raises(ValueError, match="ModelInfo.num_layers must be a positive int, got True"):
        ModelInfo("qwen2_vl", num_layers=True, num_heads=4, num_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="ModelInfo.model_type must be a string"):
        ModelInfo(None, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="ModelInfo.template must be an object"):
        ModelInfo("qwen2_vl", 3, 4, 2, 16, template="qwen")


# ---- bounds: a profile that loads cannot make a forward overflow or allocate without end (issue "Long-running
# servers"); every field is checked, and the error names it ----------------------------------------------------------

def video_report():
    means = {"intra_sink": 0.98, "intra": 0.97, "sink": 0.5}
    return {"prompts": 1, "video": means, "frame": dict(means, intra=0.88)}


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["model"]["template"].update(sinks_per_image=10 ** 30),
     r"model\.template\.sinks_per_image must be an int in \[1, 65536\], got 10+"),
    (lambda d: d["model"]["template"].update(sinks_per_image=2 ** 16 + 1), r"model\.template\.sinks_per_image"),
    (lambda d: d["model"].update(num_layers=10 ** 30), r"model\.num_layers is 10+, more than any model has"),
    (lambda d: d["model"].update(num_heads=2 ** 17, num_kv_heads=2), r"model\.num_heads is 131072"),
    (lambda d: d["model"].update(head_dim=10 ** 30), r"model\.head_dim is 10+"),
    (lambda d: d["model"].update(num_layers=5), r"categories for 3 layers but its model has 5.*model\.num_layers"),
    (lambda d: d["model"].update(num_heads=2), r"layer 0 has 4 heads.*model\.num_heads"),
    (lambda d: d["model"]["template"].update(image_token_ids=[250, 2 ** 31]),
     r"model\.template\.image_token_ids\[1\] must be a token id \(an int in \[0, 2147483647\]\)"),
    (lambda d: d["model"]["template"].update(image_token_ids=[250, 252]),
     r"model\.template: token id 252 is in both image_open_ids and image_token_ids"),
    (lambda d: d["model"]["template"].update(video_segments="frame"),
     r'model\.template\.video_segments "frame" needs video_token_ids'),
    (lambda d: d["model"]["template"].update(video_segments=["frame"]), r"model\.template\.video_segments must be"),
    (lambda d: d["calibration"].update(video_segments={"video": 1}),
     r"calibration\.video_segments\.prompts is missing"),
    (lambda d: d["calibration"]["video_segments"].update(video=1), r"calibration\.video_segments\.video must be an"),
    (lambda d: d["calibration"].update(video_segments=dict(video_report(), prompts=0)),
     r"calibration\.video_segments\.prompts must be an int in \[1, "),
    (lambda d: d["calibration"]["video_segments"]["frame"].update(sink=float("nan")),
     r"calibration\.video_segments\.frame\.sink must be a recall in \[0, 1\], got nan"),
    (lambda d: d["calibration"].update(samples=-1), r"calibration\.samples must be an int in \[0, "),
    (lambda d: d["calibration"].update(samples=True), r"calibration\.samples must be an int"),
    (lambda d: d["calibration"].update(source=5), r"calibration\.source must be a string"),
    (lambda d: d["calibration"].update(thresholds=10 ** 400),
     r"calibration\.thresholds: threshold of intra_sink must be in"),
    (lambda d: d["calibration"].update(thresholds=float("inf")),
     r"calibration\.thresholds: threshold of intra_sink .*inf"),
    (lambda d: d["calibration"].update(thresholds={"sink": 0.9, "SINK": 0.8}), r"thresholds: sink is given twice"),
    (lambda d: d["calibration"].update(quantile=float("nan")),
     r"calibration\.quantile: quantile must be in \[0, 1\], got nan"),
    (lambda d: d.update(version=2) or d["calibration"].update(thresholds=[0.9, None, 0.9]),
     r"calibration\.thresholds\[1\] must be a number or a mapping"),
    (lambda d: d["scores"].update(prompts=[]), r"scores\.prompts is empty"),
    (lambda d: d["scores"]["prompts"][1].update(sample=-1), r"scores\.prompts\[1\]\.sample must be an int in \[0, "),
    (lambda d: d["scores"]["prompts"][0].update(row=1.5), r"scores\.prompts\[0\]\.row must be an int"),
    (lambda d: d["scores"]["prompts"][0].update(image_rows=0), r"scores\.prompts\[0\]\.image_rows must be an int in"),
    (lambda d: d["scores"]["prompts"][0].update(video_segments={"frame": [[[0.5] * 3] * 4] * 2}),
     r"scores\.prompts\[0\]\.video_segments\.frame must be a list of 3 layers"),
    (lambda d: d["scores"]["prompts"][0].update(video_segments={"frames": [[[0.5] * 3] * 4] * 3}),
     r"scores\.prompts\[0\]\.video_segments\.frames is not one of"),
    (lambda d: d["scores"].update(statistic=["recall"]), r"scores\.statistic must be \"recall\""),
])
def test_every_field_is_bounded_and_named(tmp_path, mutate, message):
    """A number no model can have, an unchecked record: refused on loading as a ProfileFormatError naming the
    field (it used to load and make every forward raise OverflowError, or raise OverflowError or AttributeError
    itself)."""
    d = scored_dict()
    d["calibration"]["video_segments"] = video_report()
    mutate(d)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ProfileFormatError, match=message):
        Profile.load(path)


def test_a_profile_at_the_bounds_is_usable(tmp_path):
    """The largest sinks_per_image and token id load, and a layout is built with them; the video report prints."""
    from blindsight import Layout

    d = scored_dict()
    top = 2 ** 31 - 1
    d["model"]["template"] = {"image_open_ids": [top - 2], "image_close_ids": [top - 1], "image_token_ids": [top],
                              "sinks_per_image": 2 ** 16}
    d["calibration"].update(video_segments=video_report(), samples=2, source="test")
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    p = Profile.load(path)
    layout = Layout.from_input_ids(torch.tensor([[5, top - 2, top, top, top - 1, 5]]), p.template)
    assert layout.image[0].tolist() == [-1, 0, 0, 0, 0, -1]
    assert layout.sink[0].tolist() == [False] + [True] * 4 + [False]
    assert "video prompts (1), mean recall: video: intra_sink 0.980" in p.summary()


def test_an_integer_too_long_to_convert_is_a_format_error(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(scored_dict()).replace('"quantile": 0.0', '"quantile": ' + "9" * 5000))
    with pytest.raises(ProfileFormatError, match="corrupt profile"):
        Profile.load(path)


# ---- decide: None in a per-layer list keeps that layer's own thresholds ---------------------------------------------

def test_decide_none_keeps_the_layers_own_thresholds():
    """Recalls per head: intra_sink 0.99, intra 0.9, sink 0.5. At threshold 0.5 every head is SINK; at 0.95 only
    INTRA_SINK passes. ``decide([0.95, None, None])`` changes layer 0 only: layers 1 and 2 keep 0.5 (they used to
    get the default 0.95)."""
    at_half = scored_profile().decide(thresholds=0.5)
    assert at_half.categories == ((Category.SINK,) * 4,) * 3
    p = at_half.decide(thresholds=[0.95, None, None])
    assert p.categories == ((Category.INTRA_SINK,) * 4, (Category.SINK,) * 4, (Category.SINK,) * 4)
    half = {"intra_sink": 0.5, "intra": 0.5, "sink": 0.5}
    assert p.calibration["thresholds"] == [{"intra_sink": 0.95, "intra": 0.95, "sink": 0.95}, half, half]
    # per-layer thresholds of its own: None keeps each layer's, a number replaces one layer's
    q = p.decide(thresholds=[None, 0.95, None])
    assert q.categories == ((Category.INTRA_SINK,) * 4,) * 2 + ((Category.SINK,) * 4,)
    assert p.decide(thresholds=[None] * 3).calibration["thresholds"] == p.calibration["thresholds"]


# ---- save is atomic: a reader never sees a part of the file ---------------------------------------------------------

def test_a_reader_during_saves_sees_a_whole_profile(tmp_path):
    import threading
    import time

    big = ModelInfo("qwen2_vl", num_layers=64, num_heads=32, num_kv_heads=8, head_dim=64, template=TEMPLATE)
    profiles = [Profile.uniform("dense", big), Profile.uniform("sink", big)]
    path = tmp_path / "p.json"
    profiles[0].save(path)
    stop, errors, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            try:
                assert Profile.load(path).categories in (profiles[0].categories, profiles[1].categories)
                reads[0] += 1
            except Exception as e:  # noqa: BLE001 - any failure is the test's finding
                errors.append(e)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    deadline, saves = time.monotonic() + 1.5, 0
    while time.monotonic() < deadline and not errors:
        profiles[saves % 2].save(path)
        saves += 1
    stop.set()
    thread.join()
    assert not errors, f"after {saves} saves and {reads[0]} reads: {errors[0]!r}"
    assert reads[0] > 0 and saves > 10
    assert [f.name for f in tmp_path.iterdir()] == ["p.json"]  # no temporary file left behind


def test_save_keeps_permissions_and_writes_through_a_symlink(tmp_path):
    import os
    import stat

    path, link = tmp_path / "p.json", tmp_path / "link.json"
    Profile.uniform("dense", INFO).save(path)
    os.chmod(path, 0o640)
    link.symlink_to(path)
    Profile.uniform("sink", INFO).save(link)
    assert link.is_symlink() and Profile.load(path).categories == Profile.uniform("sink", INFO).categories
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        Profile.uniform("sink", INFO).save(tmp_path / "no-such-dir" / "p.json")
