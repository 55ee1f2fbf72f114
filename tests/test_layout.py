import pytest
import torch
from hypothesis import given, settings
from transformers import Gemma3Config, Qwen2_5_VLConfig, Qwen2VLConfig

from blindsight import Layout, LayoutError, Template, input_ids_from_spec, parse_layout_spec

from strategies import layouts

Q = Template((252,), (253,), (250, 251), 1)


def test_spec_parses_groups_and_repeats():
    assert parse_layout_spec("text:2,(image:5,text:1)x2,text:3") == [
        ("text", 2), ("image", 5), ("text", 1), ("image", 5), ("text", 1), ("text", 3)
    ]
    ids = input_ids_from_spec("text:64,(image:496,text:16)x16,text:80", Q)
    assert ids.shape == (1, 64 + 16 * 512 + 80)
    assert int((ids == 252).sum()) == 16 and int((ids == 250).sum()) == 16 * 494


@pytest.mark.parametrize("bad", ["", "text:0", "image:2", "text:3,", "(image:5)", "video:4", "text:2)x2"])
def test_spec_errors(bad):
    with pytest.raises(ValueError):
        input_ids_from_spec(bad, Q)


def test_layout_by_hand():
    t = Template((252,), (253,), (250, 251), sinks_per_image=2)
    layout = Layout.from_spec("text:2,image:4,image:3,text:1", t)
    assert layout.image.tolist() == [[-1, -1, 0, 0, 0, 0, 1, 1, 1, -1]]
    assert layout.sink.tolist() == [[0, 0, 1, 1, 0, 0, 1, 1, 0, 0]]
    assert layout.segments() == [(2, 6), (6, 9)]


def test_layout_without_delimiters_and_padding():
    t = Template((), (), (7,))
    ids = torch.tensor([[7, 7, 1, 7, 1, 1], [0, 0, 1, 7, 7, 7]])
    am = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    layout = Layout.from_input_ids(ids, t, am)
    assert layout.image.tolist() == [[0, 0, -1, 1, -1, -1], [-1, -1, -1, 0, 0, 0]]
    assert layout.sink.tolist() == [[1, 0, 0, 1, 0, 0], [0, 0, 0, 1, 0, 0]]
    assert layout.num_images.tolist() == [2, 1]


@pytest.mark.parametrize(
    "ids, where, what",
    [
        ([1, 252, 250, 252, 250, 253, 253], "position 3", "nested"),
        ([1, 250, 252, 250, 253], "position 1", "outside"),
        ([1, 253, 1], "position 1", "without an open"),
        ([1, 252, 250, 1], "position 1", "never closed"),
    ],
)
def test_malformed_delimiters_name_row_and_position(ids, where, what):
    batch = torch.tensor([[1] * len(ids), ids])
    with pytest.raises(LayoutError, match=f"row 1, {where}: .*{what}"):
        Layout.from_input_ids(batch, Q)


def test_padding_positions_are_text_even_with_image_ids():
    ids = torch.tensor([[252, 250, 1, 252, 250, 253]])
    am = torch.tensor([[0, 0, 1, 1, 1, 1]])
    assert Layout.from_input_ids(ids, Q, am).image.tolist() == [[-1, -1, -1, 0, 0, 0]]


def test_template_from_config():
    qwen = Template.from_config(Qwen2VLConfig())
    assert qwen.image_open_ids == (151652,) and qwen.image_close_ids == (151653,)
    assert qwen.image_token_ids == (151655, 151656)
    assert Template.from_config(Qwen2_5_VLConfig()).image_open_ids == (151652,)
    gemma = Template.from_config(Gemma3Config())
    assert (gemma.image_open_ids, gemma.image_close_ids, gemma.image_token_ids) == ((255999,), (256000,), (262144,))
    with pytest.raises(ValueError, match="no built-in template.*Template\\("):
        Template.from_config(type("C", (), {"model_type": "llava"})())


def test_template_validation():
    with pytest.raises(ValueError, match="parallel"):
        Template((1, 2), (3,), (4,))
    with pytest.raises(ValueError, match="differ"):
        Template((1,), (2,), (1,))


@settings(max_examples=200)
@given(layouts())
def test_layout_matches_a_token_by_token_scan(example):
    """The vectorized layout equals a plain left-to-right scan of the definition."""
    ids, am, template, layout = example
    for r in range(ids.shape[0]):
        seg, inside, pos, prev_img = -1, False, 0, False
        for t in range(ids.shape[1]):
            tok, real = int(ids[r, t]), bool(am[r, t])
            is_img = real and tok in template.image_token_ids
            if template.has_delimiters:
                if real and tok in template.image_open_ids:
                    seg, inside, pos = seg + 1, True, 0
                want = seg if inside else -1
                closing = real and tok in template.image_close_ids
            else:
                if is_img and not prev_img:
                    seg, pos = seg + 1, 0
                want = seg if is_img else -1
                closing = False
            assert int(layout.image[r, t]) == want, (r, t)
            assert bool(layout.sink[r, t]) == (want >= 0 and pos < template.sinks_per_image), (r, t)
            pos += 1
            prev_img = is_img
            if closing:
                inside = False
