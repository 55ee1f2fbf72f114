"""Real traffic: a stream of prompts through the documented calls.

``torch.compile(model, backend=blindsight_backend(profile))`` (automatic dynamic shapes, Inductor) and the
eager path ``blindsight.attach(model, profile)``: prompts of many lengths and image counts, images of
different grids within one prompt, batch 1 and 2 with left padding. Every prompt's logits equal the eager
reference of DESIGN §2 (SDPA with the definition's mask), and every prefill attention call runs sparse.

The tiny models' prompts (30-150 tokens) are far too short for sparse attention to beat dense, so the default
cost model would run them dense (``not_faster``, tested with default options in ``test_cost.py``); these
tests pass ``only_if_faster=False`` so that every call exercises the sparse run time. Every other option is
the default.
"""

import random

import pytest
import torch

import blindsight
from blindsight import blindsight_backend

from tiny_models import batch, build, layout_of, mixed_profile, prompt, reference_attention

GRIDS = [(2, 4), (4, 4), (4, 6), (4, 8), (8, 4), (6, 6), (2, 2)]


def stream(name: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` prompts: 1-4 images (Gemma-3: 1-5) of random grids, random text runs; every third a padded batch of 2."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        def one(j, i=i):
            k = rng.randint(1, 5 if name == "gemma3" else 4)
            images = [0] * k if name == "gemma3" else [rng.choice(GRIDS) for _ in range(k)]
            return prompt(name, images, [rng.randint(1, 6) for _ in range(k + 1)], seed=100 * i + j)
        out.append(batch(name, [one(0), one(1)]) if i % 3 == 2 else one(0))
    return out


def reference_logits(model, inp, profile):
    with reference_attention(model, layout_of(model, inp), profile), torch.no_grad():
        return model(**inp).logits


def check_stream(run, reference, prompts):
    for inp in prompts:
        blindsight.reset_stats()
        got = run(inp)
        s = blindsight.stats()
        real = inp["attention_mask"].bool()
        ref = reference(inp)
        torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)
        assert s.get("sparse_calls") == 2, (inp["input_ids"].shape, s)  # 2 decoder layers, every call sparse
        assert not [k for k in s if k.startswith("fallback")], s
        assert blindsight.sparse_fraction() == 1.0


STREAMS = [("qwen2_vl", 12), ("qwen2_5_vl", 6), ("gemma3", 6)]


@pytest.mark.parametrize("name, n", STREAMS)
def test_compiled_stream_is_sparse_and_exact(name, n):
    """The documented call with torch.compile's defaults.

    Compilation bound: the language model's graph is compiled at most 4 times in the whole stream, however
    long: the first prompt's static shapes; symbolic lengths (Dynamo's automatic dynamic shapes, from the
    second length on); a symbolic batch size >= 2; and batch 1 with symbolic lengths again (Dynamo specialises
    sizes 0 and 1, so batch 1 after batch 2 is a graph of its own). The model's other graphs
    (Qwen2-VL's vision position code specialises on each image grid's values) are torch.compile's own; the
    test asserts that BlindSight adds none: each graph Dynamo hands over is compiled once.
    """
    model, ref_model = build(name), build(name)
    profile = mixed_profile(model)
    torch._dynamo.reset()
    cmodel = torch.compile(model, backend=blindsight_backend(profile, only_if_faster=False))
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    totals = {"language_model_graphs": 0, "graphs_compiled": 0, "inductor_compiles": 0}

    def run(inp):
        with torch.no_grad():
            out = cmodel(**inp).logits
        for k in totals:
            totals[k] += blindsight.stats().get(k, 0)
        return out

    check_stream(run, lambda inp: reference_logits(ref_model, inp, profile), stream(name, n))
    assert 1 <= totals["language_model_graphs"] <= 4, totals
    dynamo_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    assert totals["graphs_compiled"] == totals["inductor_compiles"] == dynamo_graphs, (totals, dynamo_graphs)


@pytest.mark.parametrize("name, n", STREAMS)
def test_eager_stream_is_sparse_and_exact_without_compiling(name, n):
    model, ref_model = build(name), build(name)
    profile = mixed_profile(model)
    blindsight.attach(model, profile, only_if_faster=False)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def run(inp):
        with torch.no_grad():
            return model(**inp).logits

    check_stream(run, lambda inp: reference_logits(ref_model, inp, profile), stream(name, n, seed=1))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing was compiled
    blindsight.detach(model)
    inp = stream(name, 1, seed=2)[0]
    blindsight.reset_stats()
    with torch.no_grad():
        torch.testing.assert_close(model(**inp).logits, ref_model(**inp).logits)  # detached: dense again
    assert "sparse_calls" not in blindsight.stats()


GENERATE_PROMPTS = [([(2, 4)], [3, 2]), ([(4, 4), (2, 2)], [1, 4, 2]), ([(4, 6), (2, 4), (4, 4)], [2, 1, 3, 5])]


@pytest.mark.parametrize("path", ["compiled", "eager"])
def test_generate_matches_reference_tokens(path):
    """Greedy generate under each path gives the reference's tokens for prompts of 3 lengths; prefill is
    sparse, decode dense (counted as such, not warned)."""
    model, ref_model = build("qwen2_vl"), build("qwen2_vl")
    profile = mixed_profile(model, seed=1)
    if path == "compiled":
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, backend=blindsight_backend(profile, only_if_faster=False))
    else:
        blindsight.attach(model, profile, only_if_faster=False)
    for images, texts in GENERATE_PROMPTS:
        inp = prompt("qwen2_vl", images, texts, seed=len(images))
        with reference_attention(ref_model, layout_of(ref_model, inp), profile), torch.no_grad():
            ref = ref_model.generate(**inp, max_new_tokens=4, do_sample=False)
        blindsight.reset_stats()
        with torch.no_grad():
            out = model.generate(**inp, max_new_tokens=4, do_sample=False)
        s = blindsight.stats()
        assert torch.equal(out, ref), (out, ref)
        assert s.get("sparse_calls") == 2 and s.get("fallback.decode") == 6, s
        assert blindsight.sparse_fraction() == 1.0
