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


CLOSED = Template((), (253,), (250, 251))
TILED = Template((252,), (252,), (250,), final_part_ids=(251,))


@pytest.mark.parametrize(
    "template, ids, where, what",
    [
        (CLOSED, [1, 250, 251, 1], "position 2", "not closed"),
        (CLOSED, [1, 250, 253, 253], "position 3", "without image placeholders"),
        (TILED, [1, 251, 250, 252], "position 1", "final-part id 251 outside"),
        (TILED, [1, 252, 6, 250, 252, 6, 250], "position 1", "never closed"),
        (TILED, [1, 250, 252, 251, 250, 252], "position 1", "outside"),
    ],
)
def test_malformed_close_only_and_tiled_prompts(template, ids, where, what):
    batch = torch.tensor([[1] * len(ids), ids])
    with pytest.raises(LayoutError, match=f"row 1, {where}: .*{what}"):
        Layout.from_input_ids(batch, template)


def test_tiled_image_is_one_segment_and_back_to_back_images_two():
    # Idefics3: <fake><row_1_col_1><image>x2<fake><row_1_col_2><image>x2\n<fake><global-img><image>x2<fake>
    tiled = [252, 6, 250, 250, 252, 6, 250, 250, 5, 252, 251, 250, 250, 252]
    single = [252, 251, 250, 252]
    layout = Layout.from_input_ids(torch.tensor([[5] + tiled + single + [5]]), TILED)
    assert layout.segments() == [(1, 15), (15, 19)]
    closed = Layout.from_input_ids(torch.tensor([[5, 250, 251, 250, 253, 250, 253, 5]]), CLOSED)
    assert closed.segments() == [(1, 5), (5, 7)]


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
    with pytest.raises(ValueError, match="final_part_ids"):
        Template((1,), (1,), (2,))  # an id that opens and closes needs the final part that lets it close
    with pytest.raises(ValueError, match="final_part_ids"):
        Template((1,), (3,), (2,), final_part_ids=(4,))
    with pytest.raises(ValueError, match="close the segment it opens"):
        Template((1, 5), (6, 1), (2,), final_part_ids=(4,))
    assert Template((), (3,), (2,)).has_delimiters  # close only
    t = Template((1,), (1,), (2,), 2, final_part_ids=(4,))
    assert Template.from_dict(t.to_dict()) == t
    assert "final_part_ids" not in Template((1,), (3,), (2,)).to_dict()  # files written before it read the same


def scan_row(ids: list[int], real: list[bool], template: Template) -> tuple[list[int], list[bool]]:
    """The layout definition (DESIGN §1) as a plain left-to-right scan of one row: ``(image ids, sinks)``."""
    image, sink = [], []
    seg, inside, pos, final_seen, prev = -1, False, 0, False, None
    for tok, r in zip(ids, real):
        tok = tok if r else None  # padding is text, whatever its id
        closing = False
        if template.image_open_ids:
            if tok in template.image_open_ids and not inside:
                seg, inside, pos, final_seen = seg + 1, True, 0, False
            elif tok in template.final_part_ids:
                final_seen = True
            elif tok in template.image_close_ids and (tok not in template.toggle_ids or final_seen):
                closing = True
        elif template.image_close_ids:
            if tok in template.image_token_ids and not inside:
                seg, inside, pos = seg + 1, True, 0
            closing = tok in template.image_close_ids
        else:
            is_img = tok in template.image_token_ids
            if is_img and tok != prev:
                seg, pos = seg + 1, 0
            inside = is_img
        image.append(seg if inside else -1)
        sink.append(inside and pos < template.sinks_per_image)
        pos += 1
        prev = tok
        if closing:
            inside = False
    return image, sink


@settings(max_examples=300)
@given(layouts())
def test_layout_matches_a_token_by_token_scan(example):
    """The vectorized layout equals a plain left-to-right scan of the definition, for every delimiter scheme."""
    ids, am, template, layout = example
    for r in range(ids.shape[0]):
        image, sink = scan_row(ids[r].tolist(), am[r].bool().tolist(), template)
        assert layout.image[r].tolist() == image, r
        assert layout.sink[r].tolist() == sink, r
