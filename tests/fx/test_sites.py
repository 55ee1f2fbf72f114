"""Site discovery (blindsight.fx.sites.find_sites) on small traced graphs: which SDPA nodes are sites, and why not.

Graphs come from ``torch.fx.symbolic_trace`` with fake values (plain module paths) and from Dynamo (the graphs
a backend gets: ``L['self']...`` paths, ``example_value``s, symbolic sizes with ``dynamic=True``).
"""

import pytest
import torch

from blindsight import ProfileMismatchError, UnsupportedAttentionError
from blindsight.fx import find_sites
from blindsight.fx.sites import module_path, sdpa_args
from blindsight.hf import is_tower, language_model_layer

from tiny_graphs import HIDDEN, Attention, NoAttention, Pooler, TinyVLM, captured, profile, sdpa_calls, traced

X = torch.randn(1, 8, HIDDEN)
CAUSAL = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()


@pytest.mark.parametrize("graph", [traced, captured], ids=["symbolic_trace", "dynamo"])
def test_each_language_model_sdpa_is_a_site_with_its_layer(graph):
    gm = graph(TinyVLM(layers=3, vision_layers=2), X)
    scan = find_sites(gm, profile(layers=3))
    assert [s.layer for s in scan.sites] == [0, 1, 2]
    assert all(s.is_causal and s.scale is None for s in scan.sites)
    assert scan.skipped == {"not_language_model": 2}  # the vision tower's two, left alone
    assert not scan.static_fallback
    lm = [n for n in sdpa_calls(gm) if "language_model" in module_path(n)]
    assert [s.node for s in scan.sites] == lm


def test_symbolic_sizes_are_sites():
    """Dynamo's dynamic graphs: the length is a SymInt, so nothing is decided at compile time."""
    gm = captured(TinyVLM(), X, dynamic=True)
    q = sdpa_args(find_sites(gm, profile()).sites[0].node)["query"].meta["example_value"]
    assert isinstance(q.shape[2], torch.SymInt)
    assert len(find_sites(gm, profile()).sites) == 2


def test_a_mask_makes_non_causal_sites():
    scan = find_sites(traced(TinyVLM(), X, mask=CAUSAL), profile())
    assert len(scan.sites) == 2 and not any(s.is_causal for s in scan.sites)


@pytest.mark.parametrize("path, layer", [
    ("model.language_model.layers.7.self_attn", 7),
    ("model.layers.0.self_attn", 0),
    ("layers[12].self_attn", 12),
    ("model.vision_tower.vision_model.encoder.layers.0.self_attn", None),  # SigLIP: a layer, but vision
    ("model.visual.blocks.0.attn", None),
    ("model.language_model.layers.0.mlp", None),
    ("model.language_model.layers.0.self_attn.q_proj", None),
    ("", None),
])
def test_language_model_layer(path, layer):
    assert language_model_layer(path) == layer


def test_a_graph_rooted_at_a_vision_tower_has_no_sites():
    """Dynamo may compile a tower's forward as its own graph: its paths (``layers.0.self_attn``) look like a
    language model's, the root module says they are not."""
    gm = traced(TinyVLM(), X)
    assert len(find_sites(gm, profile()).sites) == 2
    scan = find_sites(gm, profile(), tower=True)
    assert scan.sites == [] and scan.skipped == {"not_language_model": 3} and not scan.static_fallback


@pytest.mark.parametrize("name, tower", [
    ("SiglipVisionModel", True), ("Qwen3VLVisionModel", True), ("Gemma3nAudioEncoder", True),
    ("Idefics3VisionTransformer", True), ("LlavaOnevisionModel", False), ("Qwen2VLModel", False),
    ("LlavaOnevisionForConditionalGeneration", False), ("Qwen2DecoderLayer", False),
])
def test_is_tower_by_class_name(name, tower):
    assert is_tower(type(name, (torch.nn.Module,), {})()) == tower


def test_is_tower_by_config_model_type():
    """A tower's inner module (SigLIP's encoder) is known by its config: ``siglip_vision_model``."""
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipEncoder

    assert is_tower(SiglipEncoder(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2)))
    assert not is_tower(None)


@pytest.mark.parametrize("dynamo_path, path", [
    ("L['self'].model.language_model.layers.3.self_attn", "model.language_model.layers.3.self_attn"),
    ("L['self'].model._modules['layers']._modules['3'].self_attn", "model.layers.3.self_attn"),
    ("L['self'].model.layers[3].self_attn", "model.layers.3.self_attn"),
    ("model.language_model.layers.3.self_attn", "model.language_model.layers.3.self_attn"),
])
def test_module_path_reads_the_innermost_module(dynamo_path, path):
    node = sdpa_calls(traced(TinyVLM(), X))[0]
    node.meta["nn_module_stack"] = {"outer": ("L['self'].model", torch.nn.Module), "inner": (dynamo_path, Attention)}
    assert module_path(node) == path


def _set_causal_with_mask(gm):
    for node in sdpa_calls(gm):
        node.kwargs = {**node.kwargs, "is_causal": True}


def _forget_mask_value(gm):
    for node in sdpa_calls(gm):
        mask = sdpa_args(node)["attn_mask"]
        if mask is not None:
            mask.meta.pop("val", None)


# reason -> (module, inputs, edit of the traced graph): each makes every language-model call dense
STATIC_REASONS = {
    "dropout": (dict(dropout=0.1), dict(), None),
    "decode": (dict(), dict(x=X[:, :1]), None),
    "not_self_attention": (dict(), dict(memory=torch.randn(1, 5, HIDDEN)), None),
    "mask_and_is_causal": (dict(), dict(mask=CAUSAL), _set_causal_with_mask),
    "unknown_mask": (dict(), dict(mask=CAUSAL), _forget_mask_value),
}


@pytest.mark.parametrize("reason", sorted(STATIC_REASONS))
def test_calls_that_can_never_be_sparse_are_counted_by_reason(reason):
    attention, inputs, edit = STATIC_REASONS[reason]
    gm = traced(TinyVLM(**attention).train(reason == "dropout"), **{"x": X, **inputs})
    if edit:
        edit(gm)
    scan = find_sites(gm, profile())
    assert scan.sites == []
    assert scan.static_fallback == {reason: 2}
    assert scan.skipped == {"not_language_model": 1}


def test_no_attention_no_sites():
    scan = find_sites(traced(NoAttention(), X), profile())
    assert scan.sites == [] and not scan.skipped and not scan.static_fallback


def test_sdpa_outside_decoder_layers_is_skipped():
    scan = find_sites(torch.fx.symbolic_trace(Pooler()), profile())
    assert scan.sites == [] and scan.skipped == {"not_language_model": 1}


def test_language_model_attention_without_sdpa_raises():
    with pytest.raises(UnsupportedAttentionError, match='attn_implementation="sdpa"') as e:
        find_sites(traced(TinyVLM(eager=True), X), profile())
    assert "model.language_model.layers.0.self_attn" in str(e.value)


@pytest.mark.parametrize("shape, message", [
    (dict(layers=1), "decoder layer 1, the profile only 1 layers"),
    (dict(heads=2, categories=["dense", "intra"]), "num_heads: profile has 2, model has 4"),
    (dict(head_dim=16), "head_dim: profile has 16, model has 8"),
])
def test_a_profile_of_another_shape_is_refused(shape, message):
    with pytest.raises(ProfileMismatchError, match=message):
        find_sites(traced(TinyVLM(), X), profile(**shape))
