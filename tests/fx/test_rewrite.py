"""The rewrite (blindsight.fx.rewrite.rewrite_sites) and the backend's counters, on small Dynamo graphs.

In the style of PyTorch's own pattern-rewrite tests (inductor's ``fuse_attention``): a tiny module calling
``F.scaled_dot_product_attention``, compiled; then the counters (``blindsight.stats()``) and the rewritten graph
say what the pass did: ``blindsight::attention`` replaces exactly the language model's SDPA nodes, the vision
tower's stay (and are counted), and every call that runs dense is counted by reason.
"""

import contextlib
import copy
import dataclasses

import pytest
import torch

import blindsight
from blindsight import BackendOptions, Category, Layout, Template, blindsight_backend, reference_mask, use_layout
from blindsight.fx import find_sites, rewrite_sites
from blindsight.fx.sites import module_path, node_value

from tiny_graphs import (
    HEADS,
    HIDDEN,
    KV_HEADS,
    OP,
    NoAttention,
    Recording,
    TinyVLM,
    calls,
    captured,
    profile,
    sdpa_calls,
)

TEMPLATE = Template((252,), (253,), (250,), 1)
LAYOUT = Layout.from_spec("text:2,image:6,text:1,image:5,text:2", TEMPLATE)  # 16 tokens, 2 images
S = LAYOUT.seq_len
X = torch.randn(1, S, HIDDEN, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def fresh():
    torch._dynamo.reset()
    blindsight.reset_stats()
    yield
    torch._dynamo.reset()


def compile_blindsight(model, prof, **options):
    if "only_if_faster" in {f.name for f in dataclasses.fields(BackendOptions)}:
        # a cost model that runs short calls dense would hide what the rewrite did: these graphs are tiny
        options.setdefault("only_if_faster", False)
    backend = Recording(blindsight_backend(prof, compile_dense=False, **options))
    return torch.compile(model, backend=backend, dynamic=False), backend


def counters(*names):
    s = blindsight.stats()
    return {n: s.get(n, 0) for n in names}


def fallbacks():
    return {k: v for k, v in blindsight.stats().items() if k.startswith("fallback.")}


def reference(model, x, prof):
    """The eager model with each language-model head's category mask (DESIGN §2) given to its SDPA call."""
    ref = copy.deepcopy(model)
    for i, layer in enumerate(ref.model.language_model.layers):
        layer.self_attn.reference_mask = reference_mask(LAYOUT, prof.layer_categories(i))
    with torch.no_grad():
        return ref(x)


def test_rewrite_replaces_exactly_the_language_model_sdpa_nodes():
    gm = captured(TinyVLM(layers=3, vision_layers=2), X)
    prof = profile(layers=3, categories=[Category.SINK, Category.INTRA, Category.DENSE, Category.INTRA_SINK])
    scan = find_sites(gm, prof)
    vision = [n for n in sdpa_calls(gm) if n not in {s.node for s in scan.sites}]
    metas = [dict(s.node.meta) for s in scan.sites]
    qkv = [tuple(s.node.args[:3]) for s in scan.sites]

    assert rewrite_sites(gm, scan, prof, "segments", 64) == 3

    ops = calls(gm, OP)
    assert len(ops) == 3
    assert sdpa_calls(gm) == vision and len(vision) == 2  # the vision tower's calls, untouched
    assert [s.node for s in scan.sites] == ops  # the scan now points at the new nodes
    for layer, (op, meta) in enumerate(zip(ops, metas)):
        q, k, v, mask, heads, scale, is_causal, lowering, block_size = op.args[:9]
        assert heads == [3, 2, 0, 1]  # the layer's categories, as ints (the op's schema: int[])
        assert (mask, scale, is_causal, lowering, block_size) == (None, None, True, "segments", 64)
        assert op.meta == meta  # module path and fake value carried over
        assert module_path(op) == f"model.language_model.layers.{layer}.self_attn"
        assert (q, k, v) == qkv[layer]  # the same tensors: no new graph inputs
    gm.graph.lint()


@pytest.mark.parametrize("dynamic", [False, True])
def test_repeated_kv_heads_are_given_to_the_op_unrepeated(dynamic):
    """transformers repeats K/V per query head when it passes a mask: the op takes the KV-head tensors (the
    lowering groups the heads of one KV head in one call) and the repeat is gone from the graph; exact."""
    model, prof = TinyVLM(layers=2, vision_layers=1, repeat_kv=True), profile()
    gm = captured(model, X, dynamic=dynamic)
    scan = find_sites(gm, prof)
    assert rewrite_sites(gm, scan, prof, "segments", 64) == 2
    assert counters("kv_repeats_removed") == {"kv_repeats_removed": 2}
    for op in calls(gm, OP):
        q, k, v = (node_value(a) for a in op.args[:3])
        assert q.shape[1] == HEADS and k.shape[1] == v.shape[1] == KV_HEADS
    assert not [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "expand"]
    gm.graph.lint()

    blindsight.reset_stats()
    compiled, _ = compile_blindsight(model, prof)
    with torch.no_grad(), use_layout(LAYOUT):
        out = compiled(X)
    assert counters("kv_repeats_removed", "sparse_calls") == {"kv_repeats_removed": 2, "sparse_calls": 2}
    torch.testing.assert_close(out, reference(model, X, prof), atol=1e-5, rtol=1e-5)


def test_a_repeat_used_elsewhere_is_kept():
    """A repeated K that another node also reads stays in the graph (only the op's inputs change)."""
    model, prof = TinyVLM(layers=1, vision_layers=1, repeat_kv=True), profile(layers=1)
    gm = captured(model, X)
    (site,) = find_sites(gm, prof).sites
    key = site.node.args[1]
    with gm.graph.inserting_after(site.node):
        gm.graph.call_method("sum", (key,))  # another reader of the repeated K
    scan = find_sites(gm, prof)
    rewrite_sites(gm, scan, prof, "segments", 64)
    assert key in gm.graph.nodes and len(key.users) == 1
    (op,) = calls(gm, OP)
    assert node_value(op.args[1]).shape[1] == KV_HEADS
    gm.graph.lint()


class MaskInGraph(torch.nn.Module):
    """A model that builds its causal mask from pointwise ops in its forward, as transformers does under compile."""

    def __init__(self):
        super().__init__()
        self.vlm = TinyVLM(layers=2, vision_layers=1)

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device)
        return self.vlm(x, (pos[None, :] <= pos[:, None])[None, None])


def test_a_mask_read_by_several_sites_is_materialized_once():
    model, prof = MaskInGraph(), profile()
    gm = captured(model, X)
    scan = find_sites(gm, prof)
    mask = scan.sites[0].node.kwargs["attn_mask"]
    rewrite_sites(gm, scan, prof, "segments", 64)
    (shared,) = calls(gm, torch.ops.blindsight.shared_mask.default)
    assert shared.args == (mask,)
    assert [op.args[3] for op in calls(gm, OP)] == [shared, shared]
    gm.graph.lint()

    compiled, _ = compile_blindsight(model, prof)
    with torch.no_grad(), use_layout(LAYOUT):
        out = compiled(X)
    assert counters("sparse_calls") == {"sparse_calls": 2}
    torch.testing.assert_close(out, reference(model.vlm, X, prof), atol=1e-5, rtol=1e-5)


def test_backend_runs_the_language_model_sparse_and_exact():
    model, prof = TinyVLM(layers=2, vision_layers=1), profile()
    compiled, backend = compile_blindsight(model, prof)
    with torch.no_grad(), use_layout(LAYOUT):
        out = compiled(X)
        compiled(X)
    (gm,) = backend.graphs
    assert len(calls(gm, OP)) == 2 and len(sdpa_calls(gm)) == 1
    assert counters("graphs_compiled", "language_model_graphs", "sites_found", "sites_rewritten",
                    "sites_skipped.not_language_model", "sparse_calls", "lowering.segments") == {
        "graphs_compiled": 1, "language_model_graphs": 1, "sites_found": 2, "sites_rewritten": 2,
        "sites_skipped.not_language_model": 1, "sparse_calls": 4, "lowering.segments": 4}
    assert fallbacks() == {}
    torch.testing.assert_close(out, reference(model, X, prof), atol=1e-5, rtol=1e-5)


def test_flex_lowering_is_named_in_the_op():
    compiled, backend = compile_blindsight(TinyVLM(), profile(), lowering="flex", block_size=16)
    with torch.no_grad(), use_layout(LAYOUT):
        compiled(X)
    assert {(op.args[7], op.args[8]) for op in calls(backend.graphs[0], OP)} == {("flex", 16)}
    assert counters("lowering.flex", "sparse_calls") == {"lowering.flex": 2, "sparse_calls": 2}


# reason -> (TinyVLM options, training mode, call keyword arguments, warns): each call of each language-model
# layer can never be sparse in this graph, so the graph keeps its SDPA nodes and each call is counted
STATIC = {
    "dropout": (dict(dropout=0.1), True, dict(), True),
    "decode": (dict(), False, dict(x=X[:, :1]), False),
    "not_self_attention": (dict(), False, dict(memory=torch.randn(1, 5, HIDDEN)), False),
}


@pytest.mark.parametrize("reason", sorted(STATIC))
def test_calls_that_can_never_be_sparse_are_left_alone_and_counted(reason, recwarn):
    options, training, kwargs, warns = STATIC[reason]
    compiled, backend = compile_blindsight(TinyVLM(**options).train(training), profile())
    with torch.no_grad(), use_layout(LAYOUT):
        for _ in range(2):
            compiled(**{"x": X, **kwargs})
    (gm,) = backend.graphs
    assert calls(gm, OP) == [] and len(sdpa_calls(gm)) == 3
    assert counters("sites_found", "sites_rewritten", "sites_skipped.not_language_model", "sparse_calls") == {
        "sites_found": 2, "sites_rewritten": 0, "sites_skipped.not_language_model": 1, "sparse_calls": 0}
    assert fallbacks() == {f"fallback.{reason}": 4}  # 2 layers x 2 calls
    assert any(reason in str(w.message) for w in recwarn) == warns  # normal operation is not warned


def test_autograd_graphs_are_left_alone_and_counted():
    model = TinyVLM()
    compiled, backend = compile_blindsight(model, profile())
    with use_layout(LAYOUT), pytest.warns(UserWarning, match="autograd"):
        compiled(X).sum().backward()
    assert calls(backend.graphs[0], OP) == []
    assert counters("sites_found", "sites_rewritten") == {"sites_found": 2, "sites_rewritten": 0}
    assert fallbacks() == {"fallback.autograd": 2}
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize("reason", ["no_template", "no_layout", "layout_mismatch", "no_images"])
def test_rewritten_calls_without_a_usable_layout_run_dense_and_are_counted(reason):
    """Decided per call at run time: the graph is rewritten, the op runs dense SDPA, the reason is counted.
    (no_template: neither the profile nor the options name the image ids; no_layout: no use_layout block and no
    input_ids in the running forward.)"""
    model = TinyVLM()
    compiled, backend = compile_blindsight(model, profile(), **({} if reason == "no_template" else
                                                                {"template": TEMPLATE}))
    layouts = {"no_template": None, "no_layout": None,
               "layout_mismatch": Layout.from_spec("text:2,image:6,text:2", TEMPLATE),
               "no_images": Layout.from_spec(f"text:{S}", TEMPLATE)}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if layouts[reason] is not None:
            stack.enter_context(use_layout(layouts[reason]))
        if reason != "no_images":  # text-only prompts are dense by definition: counted, not warned
            stack.enter_context(pytest.warns(UserWarning, match=reason))
        out = compiled(X)
    assert len(calls(backend.graphs[0], OP)) == 2
    assert counters("sites_rewritten", "sparse_calls") == {"sites_rewritten": 2, "sparse_calls": 0}
    assert fallbacks() == {f"fallback.{reason}": 2}
    with torch.no_grad():
        torch.testing.assert_close(out, model(X), atol=1e-6, rtol=1e-6)


def test_a_graph_without_language_model_attention_is_not_touched():
    for module, sdpa in ((NoAttention(), 0), (TinyVLM().model.vision_tower, 1)):
        torch._dynamo.reset()
        blindsight.reset_stats()
        compiled, backend = compile_blindsight(module, profile())
        with torch.no_grad():
            compiled(X)
        (gm,) = backend.graphs
        assert calls(gm, OP) == [] and len(sdpa_calls(gm)) == sdpa
        assert counters("graphs_compiled", "language_model_graphs", "sites_found", "sites_rewritten") == {
            "graphs_compiled": 1, "language_model_graphs": 0, "sites_found": 0, "sites_rewritten": 0}
        assert counters("sites_skipped.not_language_model") == {"sites_skipped.not_language_model": sdpa}
        assert fallbacks() == {}
