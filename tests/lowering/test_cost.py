"""The cost model (``only_if_faster``, the default): a call runs sparse only where it is predicted to beat dense.

Default options throughout. A prompt too short to gain runs dense, counted as ``fallback.not_faster`` and not
warned, with the dense model's output; a long one runs sparse and equals SDPA with the definition's mask.
"""

import contextlib
import warnings

import pytest
import torch

import blindsight
from blindsight import BaseMask, Category, Layout, Template, blindsight_backend, input_ids_from_spec, reference_mask
from blindsight.lowering import predicted_work, sparse_attention
from blindsight.lowering.cost import KernelRates, clear_rates, kernel_rates, predicted_seconds
from blindsight.lowering.segments import measure_segment_rates

from tiny_models import build, mixed_profile, prompt, reference_attention

TEMPLATE = Template((252,), (253,), (250,), 1)
SHORT = [([(4, 4), (2, 4)], [3, 2, 4]), ([(4, 6), (2, 2), (4, 4)], [1, 4, 2, 5])]


def _run_quietly(fn):
    """``fn()``, asserting that BlindSight did not warn (not_faster is by design)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    assert not [w for w in caught if str(w.message).startswith("BlindSight")], [str(w.message) for w in caught]
    return out


@pytest.mark.parametrize("path", ["compiled", "eager"])
def test_short_prompt_runs_dense_counted_and_exact(path, monkeypatch):
    """...without looking for the prompt's layout: no call could gain, whatever it is."""
    import blindsight.attention
    import blindsight.fx.runtime

    looked = []
    for module in (blindsight.attention, blindsight.fx.runtime):
        monkeypatch.setattr(module, "prompt_layout", lambda *a, **k: looked.append(1) or (None, "no_layout"))
    model, ref_model = build("qwen2_vl"), build("qwen2_vl")
    profile = mixed_profile(model)
    if path == "compiled":
        torch._dynamo.reset()
        run = torch.compile(model, backend=blindsight_backend(profile))
    else:
        run = blindsight.attach(model, profile)
    for images, texts in SHORT:
        inp = prompt("qwen2_vl", images, texts)
        blindsight.reset_stats()
        with torch.no_grad():
            got = _run_quietly(lambda inp=inp: run(**inp).logits)
            ref = ref_model(**inp).logits
        s = blindsight.stats()
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert s.get("fallback.not_faster") == 2 and "sparse_calls" not in s, s  # 2 decoder layers
        assert blindsight.sparse_fraction() == 1.0  # dense by design is not a missed sparse call
        assert not looked


def _attention_inputs(spec, heads=4, kv_heads=2, head_dim=64, seed=0):
    layout = Layout.from_input_ids(input_ids_from_spec(spec, TEMPLATE), TEMPLATE)
    g = torch.Generator().manual_seed(seed)
    S = layout.seq_len
    q = torch.randn(1, heads, S, head_dim, generator=g)
    k, v = (torch.randn(1, kv_heads, S, head_dim, generator=g) for _ in range(2))
    return layout, q, k, v


@pytest.fixture
def quiet_machine_rates():
    """The rates measured on an idle 2-core CPU (float32, d=64), so the decision does not depend on what else
    the machine runs during the test; measured again afterwards."""
    clear_rates()
    for head_dim in (16, 64):
        kernel_rates("segments", torch.device("cpu"), torch.float32, head_dim,
                     lambda dtype, d: KernelRates(dense_pair_s=1.8e-9, small_pair_s=1.7e-9, call_s=3.8e-4))
    yield
    clear_rates()


def test_long_prompt_runs_sparse_by_default_and_exact(quiet_machine_rates):
    """8K tokens, 16 images, no DENSE head: several times faster sparse, so the default runs it sparse."""
    layout, q, k, v = _attention_inputs("text:32,(image:480,text:8)x16,text:40")
    heads = [Category.parse(c) for c in ("intra_sink", "intra", "sink", "intra")]
    blindsight.reset_stats()
    with torch.no_grad():
        got = _run_quietly(lambda: sparse_attention(q, k, v, None, layout, heads, is_causal=True))
    assert blindsight.stats().get("sparse_calls") == 1, blindsight.stats()
    kv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for rows in torch.arange(layout.seq_len).split(1024):  # the definition's mask, a block of rows at a time
        mask = reference_mask(layout, heads, BaseMask(), rows=rows)
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, rows], *kv, attn_mask=mask)
        torch.testing.assert_close(got[:, :, rows], ref, atol=1e-5, rtol=1e-5)


def test_all_dense_heads_never_pay():
    """A profile whose heads are all DENSE skips nothing: the sparse call is predicted no faster, at any length."""
    for spec in ["text:8,(image:16,text:2)x2,text:8", "text:32,(image:480,text:8)x8,text:40"]:
        layout, q, k, v = _attention_inputs(spec)
        sparse, dense = predicted_work(q, k, None, layout, [Category.DENSE] * 4, True)
        rates = kernel_rates("segments", q.device, q.dtype, q.shape[-1], measure_segment_rates)
        assert predicted_seconds(sparse, rates) >= predicted_seconds(dense, rates)
        blindsight.reset_stats()
        with torch.no_grad():
            sparse_attention(q, k, v, None, layout, [Category.DENSE] * 4, is_causal=True)
        assert blindsight.stats() == {"fallback.not_faster": 1}


def test_predicted_sparse_work_grows_with_the_pairs_kept():
    """More images of the same total length keep fewer pairs: the predicted sparse time falls, dense stays."""
    rates = kernel_rates("segments", torch.device("cpu"), torch.float32, 64, measure_segment_rates)
    times = []
    for n in (2, 4, 8):
        size = 4096 // n - 8
        layout, q, k, _ = _attention_inputs(f"text:32,(image:{size},text:8)x{n},text:40")  # 4168 tokens each
        sparse, dense = predicted_work(q, k, None, layout, [Category.INTRA] * 4, True)
        times.append((predicted_seconds(sparse, rates), predicted_seconds(dense, rates)))
    assert times[0][0] > times[1][0] > times[2][0], times
    assert times[0][1] == times[1][1] == times[2][1], times


def test_rates_are_measured_once_per_key():
    clear_rates()
    calls = []

    def measure(dtype, head_dim):
        calls.append((dtype, head_dim))
        return measure_segment_rates(dtype, head_dim)

    a = kernel_rates("segments", torch.device("cpu"), torch.float32, 32, measure)
    b = kernel_rates("segments", torch.device("cpu"), torch.float32, 32, measure)
    c = kernel_rates("segments", torch.device("cpu"), torch.bfloat16, 32, measure)
    assert a is b and calls == [(torch.float32, 32), (torch.bfloat16, 32)]
    assert min(a.dense_pair_s, a.small_pair_s) > 0 and a.call_s >= 0 and c.small_pair_s > 0


def test_compiled_language_model_dense_graph_when_short_sparse_when_long(quiet_machine_rates):
    """Default options, compiled: a short prompt runs the graph as it came (no layout looked at, counted
    ``not_faster``) and equals the dense model; an 8K-token one runs sparse and equals the eager reference
    of DESIGN §2 (each head's category mask)."""
    model, ref_model = build("qwen2_vl"), build("qwen2_vl")
    profile = mixed_profile(model)
    torch._dynamo.reset()
    lm = torch.compile(model.model.language_model, backend=blindsight_backend(profile))
    g = torch.Generator().manual_seed(0)
    for spec, sparse in (("text:5,(image:16,text:3)x3,text:6", False), ("text:32,(image:480,text:8)x16,text:40", True)):
        layout = Layout.from_spec(spec, profile.template)
        emb = torch.randn(1, layout.seq_len, model.config.text_config.hidden_size, generator=g)
        blindsight.reset_stats()
        # the short prompt gets no layout at all: the run time must not need one to run it dense
        with torch.no_grad(), blindsight.use_layout(layout) if sparse else contextlib.nullcontext():
            got = _run_quietly(lambda emb=emb: lm(inputs_embeds=emb).last_hidden_state)
        s = blindsight.stats()
        reference = reference_attention(ref_model, layout, profile) if sparse else contextlib.nullcontext()
        with reference, torch.no_grad():
            ref = ref_model.model.language_model(inputs_embeds=emb).last_hidden_state
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        if sparse:
            assert s.get("sparse_calls") == 2 and "fallback.not_faster" not in s, s
        else:
            assert s.get("fallback.not_faster") == 2 and "sparse_calls" not in s, s
            assert s.get("dense_variants_compiled") == 1, s  # the first graph: compiled sparse and dense

