"""Prefill at an offset through transformers (DESIGN §2 and §11): a prompt fed in chunks with a cache, a cached
prefix, multi-turn generate; on both paths with default options apart from ``only_if_faster=False`` (these
prompts are too short for the cost model to pick sparse). Each compares with an independent reference: the
eager model whose heads use the definition's mask on the whole prompt."""

import copy

import pytest
import torch
from transformers import DynamicCache

import blindsight
from blindsight import Layout, Template, blindsight_backend, use_layout
from blindsight.sequence import forget

from tiny_models import build, mixed_profile, prompt, reference_attention


def image(name: str, n: int) -> list[int]:
    return [251] + [250] * n + [252] if name == "gemma3" else [252] + [250] * n + [253]


def prompt_ids(name: str, seed: int = 0) -> torch.Tensor:
    """Three images of different sizes with text around them (77-85 tokens)."""
    return torch.tensor([[5 + seed] * 7 + image(name, 23 + seed) + [6] * 3 + image(name, 9) + [7] * 5
                         + image(name, 31 - seed) + [8] * 6])


@pytest.fixture(scope="module", params=["qwen2_vl", "gemma3"])
def family(request):
    model = build(request.param)
    lm = model.model.language_model
    profile = mixed_profile(model)
    torch._dynamo.reset()
    compiled = torch.compile(lm, backend=blindsight_backend(profile, only_if_faster=False))
    return request.param, model, lm, profile, compiled


def run_path(family, path):
    name, model, lm, profile, compiled = family
    if path == "attach":
        blindsight.attach(model, profile, only_if_faster=False)
        return lm
    return compiled


def reference(family, ids):
    name, model, lm, profile, _ = family
    layout = Layout.from_input_ids(ids, Template.from_config(model.config), open_end=True)  # may end in an image
    with reference_attention(lm, layout, profile), \
            torch.no_grad():
        return lm(input_ids=ids).last_hidden_state


def chunked(run, ids, sizes, cache=None):
    cache = cache if cache is not None else DynamicCache(config=run.config)
    outs, start = [], 0
    with torch.no_grad():
        for n in sizes:
            outs.append(run(input_ids=ids[:, start:start + n], past_key_values=cache, use_cache=True)
                        .last_hidden_state)
            start += n
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("path", ["attach", "compiled"])
@pytest.mark.parametrize("sizes", [[13] * 6 + [4], [40, 41], [2, 30, 7, 20, 12, 10]])
def test_a_prompt_prefilled_in_chunks_equals_one_prefill(family, path, sizes):
    """2-7 chunks of the prompt, boundaries inside images (Gemma-3's sliding layers keep the last keys only: their
    layout is the sequence's last keys); every chunk runs sparse and the chunks equal the whole prompt's rows."""
    name, model, lm, profile, _ = family
    ids = prompt_ids(name)
    sizes = sizes[:-1] + [ids.shape[1] - sum(sizes[:-1])]
    ref = reference(family, ids)
    run = run_path(family, path)
    try:
        blindsight.reset_stats()
        got, _ = chunked(run, ids, sizes)
    finally:
        blindsight.detach(model)
    s = blindsight.stats()
    ends = torch.tensor(sizes).cumsum(0).tolist()
    with_images = sum(bool((ids[0, :e] == 250).any()) for e in ends)  # a chunk of text after text only: dense
    layers = lm.config.num_hidden_layers
    assert s.get("sparse_calls") == with_images * layers, s
    assert s.get("fallback.no_images", 0) == (len(sizes) - with_images) * layers, s
    assert not [k for k in s if k.startswith("fallback.") and k != "fallback.no_images"], s
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["attach", "compiled"])
def test_a_cached_prefix_continued_twice_equals_the_uncached_prompts(family, path):
    """Prefix caching: one forward over a shared prefix (text and an image), its cache copied for each of two
    different continuations (more images, a question): each equals its whole prompt's reference."""
    name, model, lm, profile, _ = family
    prefix = torch.tensor([[9] * 5 + image(name, 20) + [9] * 2])
    tails = [prompt_ids(name, 0)[:, :40], prompt_ids(name, 1)[:, :60]]
    run = run_path(family, path)
    try:
        _, cache = chunked(run, prefix, [prefix.shape[1]])
        blindsight.reset_stats()
        got = [chunked(run, tail, [tail.shape[1]], copy.deepcopy(cache))[0] for tail in tails]
    finally:
        blindsight.detach(model)
    s = blindsight.stats()
    assert s.get("sparse_calls") == 2 * lm.config.num_hidden_layers and not [k for k in s if "fallback" in k], s
    for tail, out in zip(tails, got):
        ref = reference(family, torch.cat([prefix, tail], 1))
        torch.testing.assert_close(out, ref[:, prefix.shape[1]:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["attach", "compiled"])
def test_unknown_earlier_tokens_run_dense_counted(family, path):
    """A cache built without BlindSight and a cache cropped run dense (counted unknown_prefix, equal to the model);
    a cache whose record is gone runs sparse inside use_layout(the whole sequence's layout)."""
    name, model, lm, profile, _ = family
    ids = prompt_ids(name)
    first, rest = ids[:, :30], ids[:, 30:]
    with torch.no_grad():
        foreign = DynamicCache(config=lm.config)
        lm(input_ids=first, past_key_values=foreign, use_cache=True)  # plain model: BlindSight saw nothing
        dense = lm(input_ids=rest, past_key_values=copy.deepcopy(foreign), use_cache=True).last_hidden_state
    run = run_path(family, path)
    try:
        blindsight.reset_stats()
        with pytest.warns(UserWarning, match="unknown_prefix"):
            got, _ = chunked(run, rest, [rest.shape[1]], copy.deepcopy(foreign))
        s = blindsight.stats()
        layers = lm.config.num_hidden_layers
        assert s.get("fallback.unknown_prefix") == layers and not s.get("sparse_calls"), s
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
        _, seen = chunked(run, first, [first.shape[1]])  # recorded, then cropped or reordered: the record is dropped
        if name == "gemma3":  # its sliding layers cannot crop
            seen.reorder_cache(torch.tensor([0]))
            kept = 30
        else:
            seen.crop(-5)
            kept = 25
        blindsight.reset_stats()
        chunked(run, ids[:, kept:], [ids.shape[1] - kept], seen)
        assert blindsight.stats().get("fallback.unknown_prefix") == layers, blindsight.stats()
        _, ours = chunked(run, first, [first.shape[1]])  # BlindSight's own prefix, its record then dropped
        forget(ours)
        blindsight.reset_stats()
        with use_layout(Layout.from_input_ids(ids, Template.from_config(model.config))):
            got, _ = chunked(run, rest, [rest.shape[1]], ours)
        assert blindsight.stats().get("sparse_calls") == layers, blindsight.stats()
    finally:
        blindsight.detach(model)
    torch.testing.assert_close(got, reference(family, ids)[:, 30:], atol=1e-5, rtol=1e-5)


TURNS = [([(4, 4), (4, 8)], [5, 3, 4]), ([(8, 4)], [3, 6]), ([(4, 4), (4, 4)], [2, 2, 5])]


def three_turns(model):
    """Greedy generate over a three-turn chat, each turn adding images, the cache carried: tokens per turn."""
    cache = DynamicCache(config=model.config)
    seq, out_tokens, counts = torch.zeros(1, 0, dtype=torch.long), [], []
    for t, (images, texts) in enumerate(TURNS):
        turn = prompt("qwen2_vl", images, texts, seed=t + 1)
        ids = torch.cat([seq, turn["input_ids"]], 1)
        blindsight.reset_stats()
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                 pixel_values=turn["pixel_values"], image_grid_thw=turn["image_grid_thw"],
                                 max_new_tokens=4, do_sample=False, suppress_tokens=[250, 251, 252, 253])
        out_tokens.append(seq[:, ids.shape[1]:])
        counts.append(blindsight.stats())
    return seq, out_tokens, counts


@pytest.mark.parametrize("path", ["attach", "compiled"])
def test_multi_turn_generate_matches_the_reference_tokens(path):
    """Each turn's prefill (its new tokens after the cached conversation) runs sparse, and the tokens equal the
    eager reference's, which applies the definition to the whole conversation at every prefill."""
    model, ref_model = build("qwen2_vl"), build("qwen2_vl")
    profile = mixed_profile(model, seed=2)
    torch._dynamo.reset()
    if path == "compiled":
        model.forward = torch.compile(model.forward, backend=blindsight_backend(profile, only_if_faster=False))
    else:
        blindsight.attach(model, profile, only_if_faster=False)
    seq, tokens, counts = three_turns(model)
    layout = Layout.from_input_ids(seq, Template.from_config(model.config))
    with reference_attention(ref_model, layout, profile):
        _, ref_tokens, _ = three_turns(ref_model)
    for got, want in zip(tokens, ref_tokens):
        assert torch.equal(got, want), (tokens, ref_tokens)
    layers = model.config.text_config.num_hidden_layers
    for s in counts:
        assert s.get("sparse_calls") == layers and s.get("fallback.decode") == 3 * layers, counts
    torch._dynamo.reset()
