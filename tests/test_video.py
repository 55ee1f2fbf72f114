"""Videos: one segment per video or per frame group (``Template.video_segments``), exact on both paths.

Qwen2/2.5-VL write a video as one pair of ``t * h * w / 4`` placeholders (its frames are cut by the prompt's
``video_grid_thw``); Qwen3-VL writes one pair per frame group inside the video's own pair. The layout is
checked against a token-by-token scan of the definition; the compiled and eager paths against the eager
reference, for videos of 2 to 4 frame groups mixed with images; calibration reports recall for both choices.
"""

import dataclasses

import pytest
import torch
from families import qwen3_vl
from families.test_families import with_template
from hypothesis import given, settings
from hypothesis import strategies as st
from test_calibrate import brute_force_recall

import blindsight
from blindsight import Layout, LayoutError, Template, blindsight_backend

from tiny_models import build, mixed_profile, reference_attention, video_prompt

TEXT, PAD, IMG, VID, OPEN, CLOSE = 5, 0, 250, 251, 252, 253
FLAT = Template((OPEN,), (CLOSE,), (IMG, VID), video_token_ids=(VID,))


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """This module compiles many models whose code objects other modules compile too (one Qwen2 decoder serves
    several families): start and leave Dynamo's caches empty, so no module meets another's recompile count."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---- the layout against the definition -------------------------------------------------------------------------

def scan_row(ids, grids, template: Template):
    """The definition as a scan of one row: ``(image ids, sinks)``. ``grids``: the t of each video in order."""
    pairs, depth, start = [], 0, None  # outermost pairs (start, end) and whether they hold frame pairs
    inner = []
    for t, tok in enumerate(ids):
        if tok == OPEN:
            depth += 1
            if depth == 1:
                start, inner = t, []
            else:
                inner.append([t, None])
        elif tok == CLOSE:
            if depth == 2:
                inner[-1][1] = t + 1
            else:
                pairs.append((start, t + 1, inner))
            depth -= 1
    segments, videos = [], iter(grids)
    for start, end, inner in pairs:
        is_video = any(ids[i] == VID for i in range(start, end))
        t = next(videos) if is_video else None
        if inner and template.video_segments == "frame":
            segments += [(a, b) for a, b in inner]
        elif is_video and template.video_segments == "frame":
            where = [i for i in range(start, end) if ids[i] == VID]
            per = len(where) // t
            cuts = [start] + [where[per * j] for j in range(1, t)] + [end]
            segments += list(zip(cuts[:-1], cuts[1:]))
        else:
            segments.append((start, end))
    image, sink = [-1] * len(ids), [False] * len(ids)
    for k, (a, b) in enumerate(segments):
        for i in range(a, b):
            image[i], sink[i] = k, i - a < template.sinks_per_image
    return image, sink


@st.composite
def video_rows(draw):
    """A row of images and videos, flat (Qwen2-VL) or with frame pairs (Qwen3-VL), and each video's t."""
    ids, grids = [], []
    for _ in range(draw(st.integers(0, 4))):
        ids += [TEXT] * draw(st.sampled_from([0, 1, 3]))
        kind = draw(st.sampled_from(["image", "flat", "framed"]))
        if kind == "image":
            ids += [OPEN] + [IMG] * draw(st.integers(1, 9)) + [CLOSE]
            continue
        t, per = draw(st.integers(1, 4)), draw(st.integers(1, 6))
        grids.append(t)
        if kind == "flat":
            ids += [OPEN] + [VID] * (t * per) + [CLOSE]
        else:  # timestamps (text) before each frame pair
            ids += [OPEN] + [tok for _ in range(t) for tok in [TEXT] * draw(st.integers(0, 2))
                             + [OPEN] + [VID] * per + [CLOSE]] + [CLOSE]
    return ids + [TEXT] * draw(st.integers(1, 4)), grids


@settings(max_examples=300)
@given(video_rows(), st.sampled_from(["video", "frame"]), st.integers(1, 3))
def test_video_layout_matches_a_token_by_token_scan(row, choice, sinks):
    ids, grids = row
    template = dataclasses.replace(FLAT, video_segments=choice, sinks_per_image=sinks)
    grid = torch.tensor([[t, 2, 2] for t in grids]).reshape(-1, 3)
    layout = Layout.from_input_ids(torch.tensor([ids]), template, video_grid_thw=grid)
    image, sink = scan_row(ids, grids, template)
    assert layout.image[0].tolist() == image
    assert layout.sink[0].tolist() == sink


@pytest.mark.parametrize("ids, grid, what", [
    ([OPEN, VID, VID, VID, CLOSE], [[2, 2, 2]], "does not split"),
    ([OPEN, VID, VID, CLOSE], None, "need the prompt's video_grid_thw"),
    ([OPEN, VID, OPEN, VID, CLOSE, CLOSE], [[1, 2, 2]], "outside the frame pairs"),
    ([OPEN, OPEN, IMG, CLOSE, CLOSE], [[1, 2, 2]], "inside a frame pair"),
    ([OPEN, VID, VID, CLOSE], [[2.0, 1, 1]], "video_grid_thw must hold integers"),  # was a TypeError (slicing)
    ([OPEN, VID, VID, CLOSE], torch.tensor([[2.0, 1.0, 1.0]]), "video_grid_thw must hold integers"),
    ([OPEN, VID, VID, CLOSE], [[2, 1]], r"video_grid_thw must be rows \(t, h, w\)"),
    ([OPEN, VID, VID, CLOSE], [["2", 1, 1]], "video_grid_thw must be integer rows"),
])
def test_malformed_videos_are_refused(ids, grid, what):
    template = dataclasses.replace(FLAT, video_segments="frame")
    with pytest.raises(LayoutError, match=what):
        Layout.from_input_ids(torch.tensor([[TEXT] + ids]), template, video_grid_thw=grid)


def test_without_videos_nesting_stays_malformed():
    images_only = Template((OPEN,), (CLOSE,), (IMG,))
    with pytest.raises(LayoutError, match="nested"):
        Layout.from_input_ids(torch.tensor([[OPEN, OPEN, IMG, CLOSE, CLOSE]]), images_only)


# ---- end to end --------------------------------------------------------------------------------------------------

QWEN2_MEDIA = ([(4, 4), (2, 4, 4), (2, 4), (4, 2, 4)], [3, 2, 1, 0, 4])  # videos of 2 and 4 frame groups
QWEN3_MEDIA = ([(64, 64), (4, 64, 96), (32, 64), (8, 32, 32)], [3, 2, 1, 1, 4])  # 2 and 4 frame groups


def models():
    out = {}
    for name in ("qwen2_vl", "qwen2_5_vl"):
        model = build(name)
        out[name] = (model, video_prompt(name, *QWEN2_MEDIA))
    model = qwen3_vl.build()
    out["qwen3_vl"] = (model, qwen3_vl.video_prompt(*QWEN3_MEDIA))
    return out


@pytest.fixture(scope="module")
def video_models():
    return models()


def logits(model, inp):
    with torch.no_grad():
        return model(**inp).logits


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("choice", ["video", "frame"])
def test_videos_mixed_with_images_are_exact(video_models, name, choice):
    model, inp = video_models[name]
    template = Template.from_config(model.config, video_segments=choice)
    profile = with_template(mixed_profile(model), template)
    layout = Layout.from_input_ids(inp["input_ids"], template, video_grid_thw=inp["video_grid_thw"])
    whole = Layout.from_input_ids(inp["input_ids"], dataclasses.replace(template, video_segments="video"))
    assert int(layout.num_images[0]) == (8 if choice == "frame" else 4) and int(whole.num_images[0]) == 4
    with reference_attention(model, layout, profile):
        ref = logits(model, inp)
    assert (ref - logits(model, inp)).abs().max() > 1e-3
    compiled = torch.compile(model, backend=blindsight_backend(profile, compile_dense=False, only_if_faster=False),
                             dynamic=False)
    blindsight.reset_stats()
    got = logits(compiled, inp)
    s = blindsight.stats()
    assert s.get("sparse_calls") == profile.model.num_layers and not any(k.startswith("fallback") for k in s), s
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    blindsight.attach(model, profile, only_if_faster=False)
    try:
        torch.testing.assert_close(logits(model, inp), ref, atol=1e-5, rtol=1e-5)
    finally:
        blindsight.detach(model)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl"])
def test_calibration_reports_recall_for_both_video_choices(video_models, name):
    model, inp = video_models[name]
    eager = (build(name, attn_implementation="eager") if name == "qwen2_vl"
             else qwen3_vl.build(attn_implementation="eager"))
    eager.load_state_dict(model.state_dict())
    template = Template.from_config(model.config)
    profile = blindsight.calibrate(model, [inp], template=template, progress=False)
    report = profile.calibration["video_segments"]
    assert report["prompts"] == 1 and set(report) == {"prompts", "video", "frame"}
    framed = dataclasses.replace(template, video_segments="frame")
    per_frame = Layout.from_input_ids(inp["input_ids"], framed, video_grid_thw=inp["video_grid_thw"])
    want = brute_force_recall(eager, inp, per_frame)
    got = torch.tensor(profile.scores["prompts"][0]["video_segments"]["frame"], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert report["frame"]["intra"] == pytest.approx(float(want[..., 1].mean()), abs=1e-5)
    assert "video prompts (1)" in profile.summary()


def test_glm4v_video_frames_are_images_of_their_own():
    """GLM-4V writes each frame group of a video as an image pair (``<|begin_of_image|>`` ... ``<|end_of_image|>``,
    then its timestamp), inside a text ``<|begin_of_video|>`` ... ``<|end_of_video|>``: one segment per group."""
    from families import glm4v

    model = glm4v.build()
    inp = glm4v.video_prompt([(4, 28, 56), (3, 56, 56)], [3, 2, 4])  # 2 + 2 frame groups
    template = Template.from_config(model.config)
    layout = Layout.from_input_ids(inp["input_ids"], template)
    assert int(layout.num_images[0]) == 4
    profile = with_template(mixed_profile(model), template)
    with reference_attention(model, layout, profile):
        ref = logits(model, inp)
    assert (ref - logits(model, inp)).abs().max() > 1e-3
    compiled = torch.compile(model, backend=blindsight_backend(profile, compile_dense=False, only_if_faster=False),
                             dynamic=False)
    blindsight.reset_stats()
    torch.testing.assert_close(logits(compiled, inp), ref, atol=1e-5, rtol=1e-5)
    assert blindsight.stats().get("sparse_calls") == profile.model.num_layers
