"""What a long-running server needs: bounded memory over many distinct prompts, no run-time raise on a documented
mask shape or from many threads, refusals users can catch, and attach/detach that leave no trace.

Each test here went red against the code before its fix (see the issue notes of "Long-running servers").
"""

import os
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import blindsight
from blindsight import (
    BaseMask,
    Category,
    Layout,
    ProfileMismatchError,
    Template,
    UnsupportedAttentionError,
    blindsight_backend,
    build_block_mask,
    reference_mask,
)
from blindsight.lowering import sparse_attention

from tiny_models import build, mixed_profile, reference_attention

TEMPLATE = Template((252,), (253,), (250, 251), 1)  # the tiny Qwen2-VL's ids


def prompt_ids(i: int, scale: int = 1) -> list[int]:
    """Prompt i of a stream: 1-3 images of sizes that depend on i (times ``scale``), so that every prompt's layout
    differs (for i < 1932)."""
    ids = [5] * (3 + i % 7)
    for j in range(1 + i % 3):
        ids += [252] + [250] * scale * (4 + (i * (j + 3)) % 23) + [253] + [6] * (1 + (i + j) % 4)
    return ids


def hidden(module, **kw):
    with torch.no_grad():
        return module(**kw).last_hidden_state


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def tiny():
    model = build("qwen2_vl")
    return model, model.model.language_model, mixed_profile(model)


def test_soak_distinct_layouts_keep_memory_bounded(tiny):
    """240 prompts of 100-1 500 tokens, every layout distinct, through attach with every call sparse: every cache
    stays within its bounds (the plan cache set to 64 MiB here), and RSS after the warm-up grows by less than 64 MB
    (before the bound, every plan was kept: RSS grew by hundreds of MB)."""
    model, lm, profile = tiny
    blindsight.clear_caches()
    blindsight.set_cache_limits("lowering.segment_plans", max_bytes=64 << 20)
    blindsight.attach(model, profile, only_if_faster=False)
    try:
        blindsight.reset_stats()
        for i in range(240):
            if i == 40:
                start = rss_mb()
            hidden(lm, input_ids=torch.tensor([prompt_ids(i, scale=20)]))
        grown = rss_mb() - start
    finally:
        blindsight.detach(model)
        blindsight.set_cache_limits("lowering.segment_plans", max_bytes=512 << 20)
    assert blindsight.stats()["sparse_calls"] == 240 * lm.config.num_hidden_layers
    info = blindsight.cache_info()
    for c in info.values():
        assert c.entries <= c.max_entries and (c.max_bytes is None or c.bytes <= c.max_bytes), c
    assert info["lowering.segment_plans"].evictions > 0 and info["layout.prompts"].evictions > 0
    assert grown < 64, f"RSS grew by {grown:.0f} MB over 200 distinct prompts"


def test_block_masks_from_threads_never_raise():
    """8 threads building block masks of distinct layouts through a small cache (lookup and eviction raced)."""
    layouts = [Layout.from_spec(f"text:{8 + i},image:{40 + 3 * i},text:4,image:{20 + i}", TEMPLATE) for i in range(12)]
    blindsight.set_cache_limits("masks.block_tiles", max_entries=2)
    errors = []

    def work(t):
        try:
            for n in range(300):
                layout = layouts[(n * 5 + t) % len(layouts)]
                mask = build_block_mask(layout, ["intra", "sink"], BaseMask(), 16)
                assert mask.kv_num_blocks.shape[:2] == (1, 2)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race showed within a few hundred calls
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
        blindsight.set_cache_limits("masks.block_tiles", max_entries=16)
    assert not errors, errors[:3]


MASK_SHAPES = ["S,S", "1,S,S", "H,S,S", "B,1,1,S", "B,1,S,S", "1,1,S,S"]


@pytest.mark.parametrize("lowering", ["segments", "flex"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_every_mask_shape_that_broadcasts_runs_sparse_and_exact(lowering, kind):
    """A mask broadcastable to [B, H, S, S] in any documented form (2-D, 3-D, key padding) runs sparse on both
    lowerings and equals SDPA with that mask AND the categories."""
    layout = Layout.from_spec("text:6,image:30,text:3,image:21,text:4", TEMPLATE)
    layout = Layout(layout.image.expand(2, -1), layout.sink.expand(2, -1))
    B, S = layout.image.shape
    heads = [Category.INTRA, Category.SINK, Category.DENSE, Category.INTRA_SINK]
    H, g = len(heads), torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, 8, generator=g) for _ in range(3))
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    padding = torch.ones(B, S, dtype=torch.bool)
    padding[1, :5] = False
    full = {"S,S": causal, "1,S,S": causal[None], "H,S,S": causal.expand(H, S, S) & (torch.rand(H, S, S, generator=g)
                                                                                      > 0.2),
            "B,1,1,S": padding[:, None, None, :], "B,1,S,S": causal & padding[:, None, None, :],
            "1,1,S,S": causal[None, None]}
    keep = reference_mask(layout, heads, BaseMask(causal=False))  # [B, H, S, S], the categories alone
    for shape in MASK_SHAPES:
        mask = full[shape]
        model_mask = mask if kind == "bool" else torch.where(mask, 0.0, float("-inf")) + 0.1 * torch.randn(
            mask.shape, generator=g)
        both = torch.broadcast_to(mask, (B, H, S, S)) & keep
        ref_mask = both if kind == "bool" else torch.where(both, torch.broadcast_to(model_mask, both.shape),
                                                           float("-inf"))
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask)
        blindsight.reset_stats()
        got = sparse_attention(q, k, v, model_mask, layout, [int(c) for c in heads], lowering=lowering,
                               only_if_faster=False)
        assert blindsight.stats().get("sparse_calls") == 1, (shape, blindsight.stats())
        rows = both.any(-1)  # rows with no key at all are undefined in SDPA
        torch.testing.assert_close(got[rows], ref[rows], atol=2e-5, rtol=2e-5, msg=shape)


def test_recompile_limit_holds_in_every_thread(tiny):
    """The backend's recompile limit is what Dynamo reads in a thread that did not build the backend (torch keeps
    config values set by assignment per thread): a server's worker threads compile against it too."""
    _, _, profile = tiny
    blindsight_backend(profile)
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch._dynamo.config.recompile_limit))
    t.start()
    t.join()
    assert seen == [64]


@pytest.mark.parametrize("shapes", ["default", "static"])
def test_threads_sharing_a_cold_compiled_model_run_every_image_call_sparse(tiny, shapes):
    """8 threads share one compiled language model that none has run yet, each with prompts of its own lengths:
    every call runs sparse and exact. ``static`` (dynamic=False, no Inductor: a recompile per length, 16 in all)
    is over Dynamo's default limit of 8, which worker threads saw before the backend raised it for every thread."""
    _, lm, profile = tiny
    torch._dynamo.reset()
    if shapes == "default":
        clm = torch.compile(lm, backend=blindsight_backend(profile, only_if_faster=False))
    else:
        clm = torch.compile(lm, backend=blindsight_backend(profile, only_if_faster=False, compile_dense=False),
                            dynamic=False)
    prompts = [torch.tensor([prompt_ids(40 + i)]) for i in range(16)]
    refs = []
    for ids in prompts:
        with reference_attention(lm, Layout.from_input_ids(ids, TEMPLATE), profile):
            refs.append(hidden(lm, input_ids=ids))
    blindsight.reset_stats()
    errors = []

    def serve(t):
        try:
            for i in (t, t + 8):
                torch.testing.assert_close(hidden(clm, input_ids=prompts[i]), refs[i], atol=1e-5, rtol=1e-5)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch._dynamo.reset()
    assert not errors, errors[:2]
    s = blindsight.stats()
    assert s.get("sparse_calls") == 16 * lm.config.num_hidden_layers, s
    assert not [k for k in s if k.startswith("fallback.")], s


def test_refusals_are_the_documented_exceptions_on_the_compiled_path(tiny):
    """A profile of another shape, or a model whose attention does not call SDPA, raises ProfileMismatchError /
    UnsupportedAttentionError itself at the compiled model's call (not Dynamo's BackendCompilerFailed), and
    blindsight.check raises the same before compiling."""
    model, lm, profile = tiny
    ids = torch.tensor([prompt_ids(3)])
    foreign = blindsight.Profile.uniform("intra", blindsight.ModelInfo("qwen2_vl", 3, 4, 2, 16, profile.model.template))
    with pytest.raises(ProfileMismatchError):
        blindsight.check(model, foreign)
    torch._dynamo.reset()
    with pytest.raises(ProfileMismatchError):
        torch.compile(model, backend=blindsight_backend(foreign))(input_ids=ids)
    eager = build("qwen2_vl", attn_implementation="eager")
    with pytest.raises(UnsupportedAttentionError, match='attn_implementation="sdpa"'):
        blindsight.check(eager, profile)
    torch._dynamo.reset()
    with pytest.raises(UnsupportedAttentionError, match='attn_implementation="sdpa"'):
        torch.compile(eager.model.language_model, backend=blindsight_backend(profile))(input_ids=ids)
    blindsight.check(model, profile)  # a fitting profile passes
    torch._dynamo.reset()


def test_reattach_then_detach_restores_the_model(tiny):
    """attach(A), attach(B), detach: the model's own attention implementation again (it was left at "blindsight"),
    the dense model's output, and B's categories while attached (not A's)."""
    model, lm, profile = tiny
    ids = torch.tensor([prompt_ids(5)])
    dense = hidden(lm, input_ids=ids)
    other = blindsight.Profile.uniform("sink", profile.model)
    blindsight.attach(model, profile, only_if_faster=False)
    blindsight.attach(model, other, only_if_faster=False)
    with reference_attention(lm, Layout.from_input_ids(ids, TEMPLATE), other):
        want = hidden(lm, input_ids=ids)
    torch.testing.assert_close(hidden(lm, input_ids=ids), want, atol=1e-5, rtol=1e-5)
    blindsight.detach(model)
    assert model.config.text_config._attn_implementation == "sdpa"
    blindsight.reset_stats()
    torch.testing.assert_close(hidden(lm, input_ids=ids), dense, atol=0, rtol=0)
    assert blindsight.stats() == {}


@pytest.mark.parametrize("path", ["attach", "compiled"])
def test_a_malformed_prompt_is_counted_once_per_forward(tiny, path):
    model, lm, profile = tiny
    ids = torch.tensor([[5, 252, 250, 250, 5, 5, 252, 250, 253, 5]])  # the first image is never closed
    if path == "attach":
        blindsight.attach(model, profile, only_if_faster=False)
        run = lm
    else:
        torch._dynamo.reset()
        run = torch.compile(lm, backend=blindsight_backend(profile, only_if_faster=False, compile_dense=False))
    try:
        blindsight.reset_stats()
        with pytest.warns(UserWarning, match="malformed_prompt"):
            for _ in range(2):
                got = hidden(run, input_ids=ids.clone())
    finally:
        blindsight.detach(model)
    s = blindsight.stats()
    assert s.get("malformed_prompts") == 2 and s.get("fallback.malformed_prompt") == 2 * lm.config.num_hidden_layers
    torch.testing.assert_close(got, hidden(lm, input_ids=ids), atol=1e-5, rtol=1e-5)



def test_the_cost_model_builds_no_gather_index_or_mask():
    """The cost model reads a layout's plan (integers and key lists) to decide; the gather indices and float
    masks only a sparse run needs are built when a call runs sparse, not for calls it then runs dense."""
    from blindsight.lowering import predicted_work
    from blindsight.lowering.segments import _PLANS

    layout = Layout.from_spec("text:40,(image:300,text:9)x4,text:20", TEMPLATE)
    q, k = torch.zeros(1, 4, layout.seq_len, 16), torch.zeros(1, 2, layout.seq_len, 16)
    heads = [int(c) for c in Category]
    blindsight.clear_caches()
    predicted_work(q, k, None, layout, heads, True, "segments")
    kinds = {key[0] for key in _PLANS._entries}
    assert "plan" in kinds and "tensors" not in kinds and "text_masks" not in kinds, kinds
    sparse_attention(q, k, k, None, layout, heads, None, True, "segments", only_if_faster=False)
    assert {"tensors", "text_masks"} <= {key[0] for key in _PLANS._entries}
