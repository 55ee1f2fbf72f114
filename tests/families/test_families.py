"""Every supported VLM family end to end on a tiny model: template, layout, calibration, compiled and eager paths.

For each family (``tests/families/<model type>.py``) a prompt with three images of different sizes and a text-only
prompt: the compiled model and the eager path (``attach``) give the logits of the eager reference (every head
masked by the DESIGN §2 mask of its category, ``tiny_models.reference_attention``) with a mixed profile that
changes the result; calibration's recall equals the definition applied to the eager model's own attention maps;
a profile made for another family is refused.
"""

import dataclasses
import importlib
from dataclasses import dataclass

import pytest
import torch
from test_calibrate import brute_force_recall

import blindsight
from blindsight import Layout, ProfileMismatchError, Template, blindsight_backend

from tiny_models import mixed_profile, reference_attention


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """This module compiles many models whose code objects other modules compile too (one Qwen2 decoder serves
    several families): start and leave Dynamo's caches empty, so no module meets another's recompile count."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@dataclass(frozen=True)
class Family:
    images: list  # three images of different sizes (the builder's units)
    texts: list  # text tokens before each image and after the last (0: images back to back)
    template: Template  # the ids the builder's processor writes
    source: str  # where BlindSight reads the template: "config" or "processor"
    segments: int = 3  # image segments the prompt's ids show


QWEN3 = Template((252,), (253,), (250, 251), video_token_ids=(251,))
FAMILIES = {
    "qwen3_vl": Family([(64, 96), (32, 32), (96, 128)], [3, 2, 1, 4], QWEN3, "config"),
    "qwen3_vl_moe": Family([(64, 96), (32, 32), (96, 128)], [3, 2, 1, 4], QWEN3,
                           "config"),
    "glm4v": Family([(56, 84), (28, 56), (84, 112)], [3, 2, 1, 4], Template((246,), (247,), (250, 251)), "config"),
    "glm4v_moe": Family([(56, 84), (28, 56), (84, 112)], [3, 2, 1, 4], Template((246,), (247,), (250, 251)),
                        "config"),
    "gemma3n": Family([(48, 64), (32, 32), (64, 40)], [3, 2, 1, 4], Template((190,), (192,), (193,)), "config"),
    "llama4": Family([(2, 3), (1, 1), (2, 1)], [3, 2, 0, 4], Template((250,), (251,), (252,)), "config"),
    "internvl": Family([(32, 64), (32, 32), (64, 64)], [3, 2, 0, 4], Template((251,), (252,), (250,)), "processor"),
    # no delimiters: the two images with no text between them are one run of placeholders, one segment
    "llava_onevision": Family([(32, 64), (32, 32), (64, 40)], [3, 2, 0, 4], Template((), (), (250, 251)), "config",
                              segments=2),
    "smolvlm": Family([(64, 96), (96, 32), (96, 96)], [3, 2, 0, 4],
                      Template((196,), (196,), (197,), final_part_ids=(198,)), "processor"),
    "idefics3": Family([(64, 96), (96, 32), (96, 96)], [3, 2, 0, 4],
                       Template((196,), (196,), (197,), final_part_ids=(198,)), "processor"),
    "mistral3": Family([(64, 64), (48, 24), (100, 40)], [3, 2, 0, 4], Template((), (252,), (250, 251)), "processor"),
}
NAMES = list(FAMILIES)


def builder(name):
    return importlib.import_module(f"families.{name}")


def family_processor(name):
    mod = builder(name)
    return mod.make_processor()


def family_template(name, model) -> Template:
    """The template as a user gets it: from the config, or from the processor where only it knows the ids."""
    if FAMILIES[name].source == "config":
        return Template.from_config(model.config)
    return Template.from_processor(family_processor(name))


def with_template(profile, template: Template):
    """The profile as calibration writes it: it carries the template it was measured with."""
    return dataclasses.replace(profile, model=dataclasses.replace(profile.model, template=template.to_dict()))


@pytest.fixture(scope="module")
def family():
    """Per family, built once: (model, template, mixed profile, image prompt, text-only prompt)."""
    cache = {}

    def get(name):
        if name not in cache:
            fam, mod = FAMILIES[name], builder(name)
            model = mod.build()
            template = family_template(name, model)
            profile = with_template(mixed_profile(model), template)
            cache[name] = (model, template, profile, mod.prompt(fam.images, fam.texts),
                           mod.prompt([], [9], seed=1))
        return cache[name]

    return get


def logits(model, inp):
    with torch.no_grad():
        return model(**inp).logits


def reference(model, inp, template, profile):
    layout = Layout.from_input_ids(inp["input_ids"], template, inp.get("attention_mask"))
    with reference_attention(model, layout, profile):
        return logits(model, inp)


@pytest.mark.parametrize("name", NAMES)
def test_template_and_layout(family, name):
    """The template read from the config or processor is the family's, and the prompt's images are its segments."""
    model, template, _, inp, text_only = family(name)
    assert template == FAMILIES[name].template
    layout = Layout.from_input_ids(inp["input_ids"], template)
    assert layout.num_images.tolist() == [FAMILIES[name].segments]
    mod = builder(name)
    if hasattr(mod, "expected_ids"):  # the processor's ids against the family's expansion written by hand
        assert inp["input_ids"][0].tolist() == mod.expected_ids(FAMILIES[name].images, FAMILIES[name].texts)
    sizes = [end - start for start, end in layout.segments()]
    assert len(set(sizes)) == len(sizes) or name == "gemma3n"  # different sizes (Gemma-3n: a fixed 4 tokens)
    assert not Layout.from_input_ids(text_only["input_ids"], template).has_images


@pytest.mark.parametrize("name", NAMES)
def test_eager_path_equals_the_reference(family, name):
    """``attach``: every call sparse and equal to the reference; a text-only prompt runs dense. (The compiled
    path on the same prompts: ``test_compiled_model_over_prompts_of_many_lengths``.)"""
    model, template, profile, inp, text_only = family(name)
    ref, dense = reference(model, inp, template, profile), logits(model, inp)
    assert (ref - dense).abs().max() > 1e-3  # the mixed profile changes the result: the comparison is not vacuous
    layers = profile.model.num_layers
    blindsight.attach(model, profile, only_if_faster=False)
    try:
        blindsight.reset_stats()
        got = logits(model, inp)
        assert blindsight.stats().get("sparse_calls") == layers, blindsight.stats()
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        blindsight.reset_stats()
        got = logits(model, text_only)
        assert blindsight.stats().get("fallback.no_images") == layers, blindsight.stats()
        torch.testing.assert_close(got, logits(blindsight.detach(model), text_only), atol=1e-5, rtol=1e-5)
    finally:
        blindsight.detach(model)


def other_prompts(name):
    """Image prompts of other lengths and layouts than the family's own: what a served model meets next."""
    fam, mod = FAMILIES[name], builder(name)
    imgs = fam.images
    return [mod.prompt(imgs[::-1], [1, 4, 2, 3], seed=2), mod.prompt(imgs[:2], [5, 1, 6], seed=3),
            mod.prompt(imgs[1:], [2, 7, 1], seed=4)]


@pytest.mark.parametrize("name", NAMES)
def test_compiled_model_over_prompts_of_many_lengths(family, name):
    """Dynamo's default (automatic dynamic shapes: the second length recompiles the graphs with symbolic sizes),
    then prompts of further lengths on those graphs: every call sparse and equal to the reference."""
    model, template, profile, inp, text_only = family(name)
    layers = profile.model.num_layers
    torch._dynamo.reset()  # transformers' forward decorators share one code object: each family starts at 0 of 64
    compiled = torch.compile(model, backend=blindsight_backend(profile, compile_dense=False, only_if_faster=False))
    for i, prompt in enumerate([inp, *other_prompts(name), text_only]):
        blindsight.reset_stats()
        got = logits(compiled, prompt)
        s = blindsight.stats()
        if prompt is text_only:
            assert s.get("fallback.no_images") == layers, s
        else:
            assert s.get("sparse_calls") == layers and not any(k.startswith("fallback") for k in s), (i, s)
        torch.testing.assert_close(got, reference(model, prompt, template, profile), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_calibration_recall_equals_the_definition(family, name):
    """Calibration on the image prompt equals the definition applied to the eager model's attention maps."""
    model, template, _, inp, _ = family(name)
    eager = builder(name).build(attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    profile = blindsight.calibrate(model, [inp], template=template, progress=False)
    assert profile.template == template
    got = torch.tensor(profile.scores["prompts"][0]["recall"], dtype=torch.float64)
    layout = Layout.from_input_ids(inp["input_ids"], template)
    want = brute_force_recall(eager, inp, layout)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (want < 0.999).any()


@pytest.mark.parametrize("name", NAMES)
def test_a_profile_of_another_family_is_refused(family, name):
    other = NAMES[(NAMES.index(name) + 1) % len(NAMES)]
    model = family(name)[0]
    foreign = family(other)[2]
    with pytest.raises(ProfileMismatchError):
        blindsight.attach(model, foreign)
    with pytest.raises(ProfileMismatchError):  # itself, at the call (not Dynamo's BackendCompilerFailed)
        torch.compile(model, backend=blindsight_backend(foreign, compile_dense=False))(**family(name)[3])


@pytest.mark.parametrize("name", ["qwen3_vl", "idefics3"])
def test_template_from_pretrained(family, name, tmp_path):
    """A saved model directory: the config's ids (Qwen3-VL), else its processor's (Idefics3)."""
    model = family(name)[0]
    model.config.save_pretrained(tmp_path)
    if FAMILIES[name].source == "processor":
        family_processor(name).save_pretrained(tmp_path)
    assert Template.from_pretrained(tmp_path) == FAMILIES[name].template
