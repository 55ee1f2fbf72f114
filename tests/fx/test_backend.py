"""The compiler pass on tiny Qwen2-VL, Qwen2.5-VL and Gemma-3 full forwards, against an eager reference."""


import pytest
import torch

import blindsight
from blindsight import (
    Category,
    ModelInfo,
    Profile,
    ProfileMismatchError,
    UnsupportedAttentionError,
    blindsight_backend,
    use_layout,
)

from tiny_models import batch, build, layout_of, mixed_profile, prompt, reference_attention

MODELS = ["qwen2_vl", "qwen2_5_vl", "gemma3"]
QWEN_A = ([(4, 4), (4, 6), (6, 8), (2, 4)], [3, 2, 5, 1, 4])  # 4 images of 4, 6, 12, 2 placeholders
QWEN_A2 = ([(2, 4), (6, 8), (4, 4), (4, 6)], [1, 5, 4, 3, 2])  # same length, images elsewhere
QWEN_B = ([(4, 4), (2, 4), (4, 4)], [2, 1, 1, 3])
GEMMA_A = ([0] * 4, [3, 2, 5, 1, 4])
GEMMA_A2 = ([0] * 4, [1, 5, 4, 3, 2])
GEMMA_B = ([0] * 3, [2, 1, 1, 3])


def prompts(name, which):
    table = {"A": (QWEN_A, GEMMA_A), "A2": (QWEN_A2, GEMMA_A2), "B": (QWEN_B, GEMMA_B)}[which]
    images, texts = table[1] if name == "gemma3" else table[0]
    return prompt(name, images, texts, seed=len(which))


def inputs(name, batch_size):
    if batch_size == 1:
        return prompts(name, "A")
    return batch(name, [prompts(name, "A"), prompts(name, "B")])


@pytest.fixture(scope="session")
def compiled():
    """One tiny model and its BlindSight-compiled twin per (model, batch size), compiled once per session."""
    cache = {}

    def get(name, batch_size, lowering="segments"):
        if (name, batch_size, lowering) not in cache:
            model = build(name)
            profile = mixed_profile(model)
            backend = blindsight_backend(profile, compile_dense=False, lowering=lowering, only_if_faster=False)
            cache[name, batch_size, lowering] = (model, torch.compile(model, backend=backend, dynamic=False), profile)
        return cache[name, batch_size, lowering]

    return get


def logits(model, inp):
    with torch.no_grad():
        return model(**inp).logits


def real(inp):
    return inp["attention_mask"].bool()


LOWERINGS = [(name, b, "segments") for name in MODELS for b in (1, 2)] + [
    ("qwen2_vl", 1, "flex"), ("qwen2_vl", 2, "flex"), ("qwen2_5_vl", 1, "flex"), ("gemma3", 2, "flex")]


@pytest.mark.parametrize("name, batch_size, lowering", LOWERINGS)
def test_sparse_logits_equal_eager_reference(compiled, name, batch_size, lowering):
    """Test 2: random per-head categories; compiled BlindSight == eager model with DESIGN §2 masks.

    Test 5 (batch 1): right after, another image arrangement of the same length reuses the sparse graph (no
    new sparse compilation; Gemma-3: no new Dynamo graph at all; Qwen re-specializes its small position
    graphs, not the language model's) and is exact too. It runs before any eager call of the same model:
    an eager forward changes model state that Dynamo guards on (Qwen's cached ``rope_deltas``).
    """
    model, cmodel, profile = compiled(name, batch_size, lowering)
    inp = inputs(name, batch_size)
    blindsight.reset_stats()
    out = logits(cmodel, inp)
    s = blindsight.stats()
    assert s.get("sparse_calls") == 2 and s.get(f"lowering.{lowering}") == 2, s
    assert not any(k.startswith("fallback") for k in s), s
    checks = [(inp, out)]
    if batch_size == 1:
        blindsight.reset_stats()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        moved = prompts(name, "A2")
        assert moved["input_ids"].shape == inp["input_ids"].shape
        checks.append((moved, logits(cmodel, moved)))
        s = blindsight.stats()
        assert s.get("sites_rewritten", 0) == 0 and s.get("sparse_calls") == 2, s  # the language model graph reused
        if name == "gemma3":
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    for x, got in checks:
        with reference_attention(model, layout_of(model, x), profile):
            ref = logits(model, x)
        dense = logits(model, x)
        m = real(x)
        torch.testing.assert_close(got[m], ref[m], atol=1e-5, rtol=1e-5)
        assert (got[m] - dense[m]).abs().max() > 1e-3  # the masks changed the result: the test is not vacuous


@pytest.mark.parametrize("name", ["qwen2_vl", "gemma3"])
def test_no_image_and_malformed_prompts_run_dense(compiled, name):
    """Test 4: a text-only prompt and one with a stray close delimiter run dense, counted, == eager."""
    model, cmodel, profile = compiled(name, 1)
    S = inputs(name, 1)["input_ids"].shape[1]
    text = prompt(name, [], [S])
    malformed = prompt(name, [], [S])
    malformed["input_ids"][0, 5] = 253 if name != "gemma3" else 252  # a close delimiter with no open one
    for inp, reason in [(text, "fallback.no_images"), (malformed, "fallback.malformed_prompt")]:
        blindsight.reset_stats()
        out = logits(cmodel, inp)
        s = blindsight.stats()
        assert s.get(reason) == 2 and "sparse_calls" not in s, s
        torch.testing.assert_close(out, logits(model, inp), atol=1e-5, rtol=1e-5)


def test_all_dense_profile_equals_compiled_dense():
    """Test 1: with an all-DENSE profile BlindSight equals torch.compile's own (Inductor) output."""
    model = build("qwen2_vl")
    inp = inputs("qwen2_vl", 1)
    profile = Profile.uniform("dense", model)
    blindsight.reset_stats()
    out = logits(torch.compile(model, backend=blindsight_backend(profile, only_if_faster=False), dynamic=False), inp)
    s = blindsight.stats()
    assert s["sites_found"] == s["sites_rewritten"] == s["sparse_calls"] == model.config.text_config.num_hidden_layers
    assert s["sites_skipped.not_language_model"] >= 1  # the vision tower's attention is left alone
    torch._dynamo.reset()
    dense = logits(torch.compile(model, dynamic=False), inp)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def test_generate_matches_reference_tokens():
    """Test 3: greedy generate with a compiled forward gives the reference's tokens; decode runs dense."""
    model = build("qwen2_vl")
    profile = mixed_profile(model, seed=1)
    inp = inputs("qwen2_vl", 1)
    with reference_attention(model, layout_of(model, inp), profile), torch.no_grad():
        ref = model.generate(**inp, max_new_tokens=4, do_sample=False)
    dense = model.generate(**inp, max_new_tokens=4, do_sample=False)
    backend = blindsight_backend(profile, compile_dense=False, only_if_faster=False)
    model.forward = torch.compile(model.forward, backend=backend)
    blindsight.reset_stats()
    with torch.no_grad():
        out = model.generate(**inp, max_new_tokens=4, do_sample=False)
    s = blindsight.stats()
    assert torch.equal(out, ref), (out, ref, dense)
    assert s.get("sparse_calls") == 2 and s.get("fallback.decode", 0) >= 2, s


def _lm_inputs(model, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, S, model.config.text_config.hidden_size, generator=g)


def test_use_layout_drives_a_model_fed_inputs_embeds():
    """The language model alone, fed inputs_embeds: sparse inside use_layout, dense (counted) outside."""
    model = build("qwen2_vl")
    lm = model.model.language_model
    profile = mixed_profile(model)
    template = blindsight.Template.from_config(model.config)
    layout = blindsight.Layout.from_spec("text:3,(image:6,text:2)x3,image:5,text:4", template)
    emb = _lm_inputs(model, layout.seq_len)
    backend = blindsight_backend(profile, compile_dense=False, only_if_faster=False)
    clm = torch.compile(lm, backend=backend, dynamic=False)
    blindsight.reset_stats()
    with torch.no_grad():
        dense = clm(inputs_embeds=emb).last_hidden_state
        with use_layout(layout):
            out = clm(inputs_embeds=emb).last_hidden_state
        with use_layout(blindsight.Layout.from_spec("text:3,image:6", template)):
            clm(inputs_embeds=emb)
        with reference_attention(lm, layout, profile):
            ref = lm(inputs_embeds=emb).last_hidden_state
    s = blindsight.stats()
    assert s.get("fallback.no_layout") == 2 and s.get("fallback.layout_mismatch") == 2 and s.get("sparse_calls") == 2, s
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense, lm(inputs_embeds=emb).last_hidden_state.detach(), atol=1e-5, rtol=1e-5)


def test_profile_of_another_shape_raises():
    """A profile for 8 heads on a 4-head model is refused at the compiled model's call, saying what differs."""
    model = build("qwen2_vl")
    info = ModelInfo("qwen2_vl", num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16)
    backend = blindsight_backend(Profile.uniform("intra", info), only_if_faster=False)
    clm = torch.compile(model.model.language_model, backend=backend)
    with pytest.raises(ProfileMismatchError, match="num_heads: profile has 8, model has 4"):
        clm(input_ids=torch.tensor([[1, 2, 3, 4]]))


def test_eager_attention_model_raises_clear_error():
    """A model whose attention never reaches SDPA gets told to load it with sdpa (UnsupportedAttentionError)."""
    model = build("qwen2_vl", attn_implementation="eager")
    backend = blindsight_backend(mixed_profile(model), only_if_faster=False)
    clm = torch.compile(model.model.language_model, backend=backend)
    with pytest.raises(UnsupportedAttentionError, match='attn_implementation="sdpa"'):
        clm(input_ids=torch.tensor([[1, 2, 3, 4]]))


@pytest.mark.parametrize("lowering", ["flex", "segments"])
@pytest.mark.parametrize("mask_kind", ["additive"])  # bool and is_causal: the model tests above
def test_lowering_keeps_the_calls_own_mask(mask_kind, lowering):
    """``blindsight::attention`` (what each rewritten site calls), compiled, equals SDPA given the call's own mask
    AND the categories: an additive float mask (finite biases and -inf), a bool mask, or is_causal."""
    from blindsight import BaseMask, Layout, Template, reference_mask
    from blindsight.lowering import calls_use

    layout = Layout.from_spec("text:5,(image:20,text:3)x4,text:6", Template((252,), (253,), (250,), 1))
    S, H = layout.seq_len, 4
    heads = [int(Category.SINK), int(Category.INTRA), int(Category.DENSE), int(Category.INTRA_SINK)]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, S, 16, generator=g) for _ in range(3))
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    if mask_kind == "additive":
        mask = torch.randn(1, 1, S, S, generator=g).masked_fill(~causal, float("-inf"))
        mask[..., 3] = float("-inf")
    elif mask_kind == "bool":
        mask = (causal & (torch.rand(S, S, generator=g) > 0.2)) | torch.eye(S, dtype=torch.bool)
        mask = mask[None, None]
    else:
        mask = None
    fn = torch.compile(lambda q, k, v, m: torch.ops.blindsight.attention(
        q, k, v, m, heads, 0.3, mask is None, lowering, 32, False), dynamic=False)
    blindsight.reset_stats()
    with calls_use(layout):
        out = fn(q, k, v, mask)
    assert blindsight.stats().get(f"lowering.{lowering}") == 1
    keep = reference_mask(layout, [Category(h) for h in heads], BaseMask(causal=False))
    if mask is None:
        full = torch.where(keep & causal, 0.0, float("-inf"))
    elif mask.dtype == torch.bool:
        full = torch.where(keep & mask, 0.0, float("-inf"))
    else:
        full = mask + torch.where(keep, 0.0, float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full, scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
