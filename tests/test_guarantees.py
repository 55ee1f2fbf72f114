"""What BlindSight guarantees: every call is exact (sparse with its own prompt's layout) or dense and counted.

Regression tests for the ways this broke (stale layouts across forwards, a layout memo keyed by memory address,
hand-made layouts, unchecked templates, inference mode, autograd, Dynamo's recompile limit), and a hypothesis
stream property over one compiled language model.
"""

import dataclasses
import threading
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import blindsight
from blindsight import Layout, LayoutError, ModelInfo, Profile, ProfileMismatchError, Template, blindsight_backend
from blindsight.layout import layout_from_ids

from strategies import DELIMITED, PAD, rows
from tiny_models import build, mixed_profile, reference_attention

TEMPLATE = Template((252,), (253,), (250, 251), 1)  # the tiny Qwen2-VL's ids (strategies.DELIMITED)


@pytest.fixture(scope="module")
def lm():
    """The tiny Qwen2-VL's language model, its mixed profile, and the documented compiled call (defaults)."""
    model = build("qwen2_vl")
    lm = model.model.language_model
    profile = mixed_profile(model)
    return lm, profile, torch.compile(lm, backend=blindsight_backend(profile, only_if_faster=False))


def padded(id_rows, left=True):
    S = max(len(r) for r in id_rows)
    ids = torch.full((len(id_rows), S), PAD, dtype=torch.long)
    mask = torch.zeros(len(id_rows), S, dtype=torch.long)
    for i, r in enumerate(id_rows):
        sl = slice(S - len(r), S) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def hidden(module, **kw):
    with torch.no_grad():
        return module(**kw).last_hidden_state


def reference(lm, profile, ids, mask, **kw):
    layout = Layout.from_input_ids(ids, TEMPLATE, mask)
    with reference_attention(lm, layout, profile):
        return hidden(lm, attention_mask=mask, **(kw or {"input_ids": ids}))


def assert_real_close(got, ref, mask):
    m = mask.bool()
    torch.testing.assert_close(got[m], ref[m], atol=1e-5, rtol=1e-5)


PROMPT_A = [5] * 3 + [252] + [250] * 6 + [253] + [5] * 2 + [252] + [250] * 5 + [253] + [5] * 4
PROMPT_B = [5] * 2 + [252] + [250] * 9 + [253] + [5] * 5 + [252] + [250] * 2 + [253] + [5] * 2  # same length


def test_inputs_embeds_never_inherit_an_earlier_prompts_layout(lm):
    """Item 1: ids (prompt A), then inputs_embeds only (prompt B, same size): B runs dense, counted and warned;
    inside use_layout it runs sparse with B's layout. (It used to run with A's layout.)"""
    lm, profile, clm = lm
    ids_a, mask = padded([PROMPT_A])
    ids_b, _ = padded([PROMPT_B])
    assert ids_a.shape == ids_b.shape
    hidden(clm, input_ids=ids_a, attention_mask=mask)
    emb = lm.embed_tokens(ids_b).detach()
    blindsight.reset_stats()
    with pytest.warns(UserWarning, match="no_layout"):
        got = hidden(clm, inputs_embeds=emb, attention_mask=mask)
    assert blindsight.stats().get("fallback.no_layout") == 2 and blindsight.sparse_fraction() == 0.0
    torch.testing.assert_close(got, hidden(lm, inputs_embeds=emb, attention_mask=mask), atol=1e-5, rtol=1e-5)
    with blindsight.use_layout(Layout.from_input_ids(ids_b, TEMPLATE)):
        got = hidden(clm, inputs_embeds=emb, attention_mask=mask)
    assert_real_close(got, reference(lm, profile, ids_b, mask, inputs_embeds=emb), mask)


def test_reused_buffers_get_each_requests_layout(lm):
    """Item 2: a server reusing one ids buffer and one mask buffer (written through numpy, which torch's version
    counter does not see) gets each request's padding layout, not the previous one's."""
    lm, profile, clm = lm
    n = len(PROMPT_A) + 5
    ids_buf, mask_buf = np.zeros((1, n), dtype=np.int64), np.zeros((1, n), dtype=np.int64)
    ids, mask = torch.from_numpy(ids_buf), torch.from_numpy(mask_buf)
    for pad in (0, 5, 2):
        ids_buf[0] = [PAD] * pad + PROMPT_A + [5] * (n - len(PROMPT_A) - pad)
        mask_buf[0] = [0] * pad + [1] * (n - pad)
        blindsight.reset_stats()
        got = hidden(clm, input_ids=ids, attention_mask=mask)
        assert blindsight.stats().get("sparse_calls") == 2
        assert_real_close(got, reference(lm, profile, ids.clone(), mask.clone()), mask)


def test_layout_memo_compares_content_under_inference_mode():
    """Item 2 and 5 at the unit level: same buffer, new content -> new layout; inference tensors work."""
    ids = torch.tensor([[5, 252, 250, 250, 253, 5, 252, 250, 253]])
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        ids_i, mask_i = ids.clone(), mask.clone()
        first = layout_from_ids(ids_i, TEMPLATE, mask_i)
        mask_i.numpy()[0, :5] = 0  # behind torch's back
        second = layout_from_ids(ids_i, TEMPLATE, mask_i)
    assert first.key != second.key
    assert second.key == Layout.from_input_ids(ids, TEMPLATE, mask_i.clone()).key


def test_hand_made_layouts_are_checked():
    """Item 3: an image id used by two separate runs, ids out of order, and a sink on a text token are refused."""
    good = Layout(torch.tensor([[-1, 0, 0, -1, 1, 1]]), torch.tensor([[0, 1, 0, 0, 1, 0]], dtype=torch.bool))
    assert good.has_images
    bad = [
        ([[-1, 0, 0, -1, 0, 0]], [[0, 1, 0, 0, 0, 0]], "id 0 starts a segment where id 1"),
        ([[-1, 1, 1, -1, 0, 0]], [[0, 1, 0, 0, 1, 0]], "id 1 starts a segment where id 0"),
        ([[-1, 0, 0, -1, 1, 1]], [[1, 1, 0, 0, 1, 0]], "sink flag on a text token"),
        ([[-2, 0, 0, -1, 1, 1]], [[0, 1, 0, 0, 1, 0]], "image id -2"),
    ]
    for image, sink, message in bad:
        with pytest.raises(LayoutError, match=message):
            Layout(torch.tensor(image), torch.tensor(sink, dtype=torch.bool))


def test_profile_template_is_checked_against_the_model():
    """Item 4: the backend runs the full model check: a template whose placeholder is an ordinary word, ids outside
    the vocabulary, and a profile with more layers than the model are refused (also by attach)."""
    model = build("qwen2_vl")
    info = ModelInfo.from_config(model)
    word = dict(info.template, image_token_ids=[17, 251])
    outside = dict(info.template, image_token_ids=[900, 251])
    more_layers = ModelInfo(info.model_type, 8, info.num_heads, info.num_kv_heads, info.head_dim, info.template)
    cases = [(Profile.uniform("intra", ModelInfo(**{**info.__dict__, "template": word})), "image_token_ids"),
             (Profile.uniform("intra", ModelInfo(**{**info.__dict__, "template": outside})), "vocabulary"),
             (Profile.uniform("intra", more_layers), "num_layers: profile has 8, model has 2")]
    inp = {"input_ids": torch.tensor([PROMPT_A[:3] + [5] * 4]), "attention_mask": torch.ones(1, 7, dtype=torch.long)}
    for profile, message in cases:
        torch._dynamo.reset()
        with pytest.raises(Exception, match=message):
            hidden(torch.compile(model.model, backend=blindsight_backend(profile, only_if_faster=False)), **inp)
        with pytest.raises(ProfileMismatchError, match=message):
            blindsight.attach(model, profile, only_if_faster=False)


def test_inference_mode_runs_sparse(lm):
    """Item 5: inputs made under torch.inference_mode() (what serving code uses)."""
    lm, profile, clm = lm
    ids, mask = padded([PROMPT_A, PROMPT_B[:18]])
    blindsight.reset_stats()
    with torch.inference_mode():
        got = clm(input_ids=ids, attention_mask=mask).last_hidden_state
    assert blindsight.stats().get("sparse_calls") == 2
    assert_real_close(got, reference(lm, profile, ids, mask), mask)


def test_autograd_runs_dense_counted_and_warned():
    """Item 6: a forward with autograd on runs dense (exact), counted and warned; never an internal error."""
    model = build("qwen2_vl")
    lm = model.model.language_model
    clm = torch.compile(lm, backend=blindsight_backend(mixed_profile(model), only_if_faster=False))
    ids, mask = padded([PROMPT_A])
    blindsight.reset_stats()
    with pytest.warns(UserWarning, match="torch.no_grad"):
        got = clm(input_ids=ids, attention_mask=mask).last_hidden_state
    assert blindsight.stats().get("fallback.autograd") == 2 and "sparse_calls" not in blindsight.stats()
    got.sum().backward()  # the dense graph trains
    torch.testing.assert_close(got.detach(), hidden(lm, input_ids=ids, attention_mask=mask), atol=1e-5, rtol=1e-5)
    blindsight.reset_stats()  # and the eager path
    blindsight.attach(model, mixed_profile(model), only_if_faster=False)
    with pytest.warns(UserWarning, match="torch.no_grad"):
        lm(input_ids=ids, attention_mask=mask)
    assert blindsight.stats().get("fallback.autograd") == 2


@st.composite
def calls(draw):
    """One forward: ids (+ a reused mask buffer), inputs_embeds, or inputs_embeds inside use_layout."""
    batch = [draw(rows(DELIMITED, max_images=3)) for _ in range(draw(st.integers(1, 3)))]
    return draw(st.sampled_from(["ids", "ids_buffer", "embeds", "embeds_layout"])), batch, draw(st.booleans())


_BUFFERS: dict = {}


@settings(max_examples=20)
@given(st.lists(calls(), min_size=1, max_size=3))
def test_stream_property(lm, sequence):
    """After every call of a random sequence the output equals the reference with that call's own layout, or
    dense with the fallback counted. Never anything else."""
    lm, profile, clm = lm
    for mode, id_rows, left in sequence:
        ids, mask = padded([r or [5] for r in id_rows], left)
        if mode == "ids_buffer":  # one numpy buffer per shape, rewritten in place (a server's request buffers)
            buf = _BUFFERS.setdefault(tuple(mask.shape), np.zeros(tuple(mask.shape), dtype=np.int64))
            buf[...] = mask.numpy()
            mask = torch.from_numpy(buf)
        blindsight.reset_stats()
        layout = Layout.from_input_ids(ids, TEMPLATE, mask)
        if mode in ("ids", "ids_buffer"):
            got = hidden(clm, input_ids=ids, attention_mask=mask)
            ref = reference(lm, profile, ids, mask)
        else:
            emb = lm.embed_tokens(ids).detach()
            if mode == "embeds_layout":
                with blindsight.use_layout(layout):
                    got = hidden(clm, inputs_embeds=emb, attention_mask=mask)
                ref = reference(lm, profile, ids, mask, inputs_embeds=emb)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    got = hidden(clm, inputs_embeds=emb, attention_mask=mask)
                ref = hidden(lm, inputs_embeds=emb, attention_mask=mask)
        s = blindsight.stats()
        if ids.shape[1] == 1:
            expected = {"fallback.decode": 2}  # one query token: dense by definition
        elif mode == "embeds":
            expected = {"fallback.no_layout": 2}
        else:
            expected = {"sparse_calls": 2} if layout.has_images else {"fallback.no_images": 2}
        assert {k: v for k, v in s.items() if k == "sparse_calls" or k.startswith("fallback")} == expected, (mode, s)
        assert_real_close(got, ref, mask)


def test_threads_each_get_their_own_layout(lm):
    """Two threads serving different prompts at once through one compiled model: each exact."""
    lm, profile, clm = lm
    prompts = [padded([PROMPT_A]), padded([PROMPT_B]), padded([PROMPT_A, PROMPT_B[:18]]), padded([PROMPT_B[:15]])]
    refs = [reference(lm, profile, ids, mask) for ids, mask in prompts]
    for ids, mask in prompts:  # compile every shape first
        hidden(clm, input_ids=ids, attention_mask=mask)
    errors = []

    def serve(order):
        try:
            for _ in range(3):
                for i in order:
                    ids, mask = prompts[i]
                    assert_real_close(hidden(clm, input_ids=ids, attention_mask=mask), refs[i], mask)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(o,)) for o in ([0, 1, 2, 3], [3, 2, 1, 0])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_recompile_limit_calls_are_counted_one_by_one_and_warned():
    """A function Dynamo stops compiling (its recompile limit) runs without BlindSight: each of its attention
    calls is counted and the first warned; the output is the dense model's. A plain eager call counts nothing."""
    model = build("qwen2_vl")
    lm = model.model.language_model
    layers = lm.config.num_hidden_layers
    torch._dynamo.reset()
    backend = blindsight_backend(mixed_profile(model), recompile_limit=None, only_if_faster=False)
    clm = torch.compile(lm, backend=backend, dynamic=False)
    blindsight.reset_stats()
    try:
        with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=False):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                hidden(clm, input_ids=torch.tensor([PROMPT_A[:20]]))
                got = [hidden(clm, input_ids=torch.tensor([PROMPT_A[:n]])) for n in (21, 22)]
    finally:
        # Dynamo now runs this code object (every Qwen2-VL text model's forward) uncompiled for new shapes,
        # in this whole process: forget it, or later tests' compiled models would silently run eagerly
        torch._dynamo.reset()
    s = blindsight.stats()
    assert s.get("sparse_calls") == layers and s.get("fallback.recompile_limit") == 2 * layers, s
    assert s.get("recompile_limit_hits", 0) >= 1
    assert any("recompile_limit" in str(w.message) for w in caught)
    for n, out in zip((21, 22), got):
        torch.testing.assert_close(out, hidden(lm, input_ids=torch.tensor([PROMPT_A[:n]])), atol=1e-6, rtol=0)
    assert blindsight.stats() == s  # the eager calls just above: no compiled region, nothing counted


def break_graph_before(modules) -> None:
    """A forward pre-hook that breaks Dynamo's graph: each module's forward becomes a graph of its own."""
    for m in modules:
        m.register_forward_pre_hook(lambda *_: torch._dynamo.graph_break())


@pytest.mark.parametrize("root", ["decoder_layer", "attention"])
def test_graphs_of_one_decoder_layer_or_one_attention_module_run_sparse(root):
    """A graph break before each decoder layer, or before each attention module, makes Dynamo compile that module's
    forward as a graph of its own: each runs sparse with its own layer's categories, exact. (A graph rooted at an
    attention module used to run dense, counted only as a skipped site at compile time.)"""
    model = build("qwen2_vl")
    lm = model.model.language_model
    profile = mixed_profile(model)
    break_graph_before(layer if root == "decoder_layer" else layer.self_attn for layer in lm.layers)
    ids = torch.tensor([PROMPT_A])
    torch._dynamo.reset()
    blindsight.reset_stats()
    try:
        got = hidden(torch.compile(lm, backend=blindsight_backend(profile, only_if_faster=False)), input_ids=ids)
    finally:
        torch._dynamo.reset()  # forget graphs guarded on these hooks
    s = blindsight.stats()
    layers = lm.config.num_hidden_layers
    assert s.get("one_layer_graphs") == layers and s.get("sparse_calls") == layers, s
    assert not [k for k in s if k.startswith("fallback.")], s
    torch.testing.assert_close(got, reference(lm, profile, ids, torch.ones_like(ids)), atol=1e-5, rtol=1e-5)


def test_one_layer_graph_of_a_layer_the_profile_lacks_is_refused():
    """Graphs of one decoder layer carry no config to check the profile's layer count against: the layer that
    runs is checked at run time, and one the profile lacks raises (it used to run dense as ``no_layer``)."""
    model = build("qwen2_vl")
    lm = model.model.language_model
    full = mixed_profile(model)
    short = Profile(dataclasses.replace(full.model, num_layers=1), full.categories[:1], {})
    break_graph_before(lm.layers)
    torch._dynamo.reset()
    try:
        with pytest.raises(ProfileMismatchError, match="decoder layer 1, the profile only 1 layers"):
            hidden(torch.compile(lm, backend=blindsight_backend(short, only_if_faster=False)),
                   input_ids=torch.tensor([PROMPT_A]))
    finally:
        torch._dynamo.reset()


def test_frames_left_uncompiled_under_suppress_errors_are_counted_and_warned():
    """Under ``suppress_errors`` a frame Dynamo failed to compile (here: the backend refuses a profile of another
    head count) runs eagerly: each of its attention calls is counted ``uncompiled`` and the first warned; the output
    is the dense model's."""
    model = build("qwen2_vl")
    lm = model.model.language_model
    full = mixed_profile(model)
    wrong = Profile(dataclasses.replace(full.model, num_heads=2 * full.model.num_heads),
                    tuple(layer * 2 for layer in full.categories), {})
    ids = torch.tensor([PROMPT_A])
    torch._dynamo.reset()
    blindsight.reset_stats()
    try:
        with torch._dynamo.config.patch(suppress_errors=True, fail_on_recompile_limit_hit=False), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = hidden(torch.compile(lm, backend=blindsight_backend(wrong, only_if_faster=False)), input_ids=ids)
    finally:
        torch._dynamo.reset()
    s = blindsight.stats()
    assert s.get("fallback.uncompiled") == lm.config.num_hidden_layers and not s.get("sparse_calls"), s
    assert any("(uncompiled)" in str(w.message) for w in caught)
    torch.testing.assert_close(got, hidden(lm, input_ids=ids), atol=1e-6, rtol=0)
