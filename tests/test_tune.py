"""blindsight.tune: the search against fake scorers, and against a tiny model with a planted head that matters."""

import json
import math

import pytest
import torch

import blindsight
from blindsight import Category, Layout, Profile, ProfileFormatError
from blindsight.categories import SPARSE_CATEGORIES, decide_categories
from blindsight.scoring import Example, accuracy, flop_reductions
from blindsight.tune import HoldoutError, TuneConfig, ladder, search, tune

from tiny_models import build, prompt, reference_attention

D, S, N, X = Category.DENSE, Category.SINK, Category.INTRA, Category.INTRA_SINK  # N: iNtra
PAIRS = {D: 100, X: 40, N: 30, S: 10}  # kept pairs of one head per category: what the fake FLOPs are made of


def _flops(cats):
    """Attention FLOPs of ``cats`` relative to dense, from PAIRS (independent of the search's own sum)."""
    heads = [c for layer in cats for c in layer]
    return 1 - sum(PAIRS[c] for c in heads) / (len(heads) * PAIRS[D])


def harm_scorer(harm, total, dense_hits, calls=None):
    """A scorer whose candidate loses ``harm[(layer, head)][category]`` examples (0 when absent); it honours
    max_misses as tune's does, scoring examples in order (the lost ones first)."""
    def score(cats, max_misses, number, stage):
        if calls is not None:
            calls.append(cats)
        lost = sum(harm.get((layer, h), {}).get(c, 0) for layer, row in enumerate(cats) for h, c in enumerate(row))
        lost = min(lost, dense_hits)
        hits_each = [False] * (total - dense_hits + lost) + [True] * (dense_hits - lost)
        scored = []
        for hit in hits_each:
            scored.append(hit)
            if max_misses is not None and len(scored) - sum(scored) > max_misses:
                break
        return sum(scored), len(scored)
    return score


def monotone_harm(agg, scale=3.0):
    """Each head loses more the less recall its category keeps: monotone along every ladder."""
    L, H, _ = agg.shape
    harm = {}
    for layer in range(L):
        for h in range(H):
            harm[layer, h] = {c: int(scale * 10 * (1 - agg[layer, h, SPARSE_CATEGORIES.index(c)])) for c in (X, N, S)}
    return harm


def synthetic_recall(L=3, H=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 0.5 * torch.rand(L, H, 3, generator=g, dtype=torch.float64)


def test_ladder_lowers_thresholds_one_assignment_at_a_time():
    agg = synthetic_recall()
    dense = torch.zeros(3, dtype=torch.bool)
    start = torch.full((3, 3), math.inf, dtype=torch.float64)
    allc = tuple(tuple([D] * 4) for _ in range(3))
    points = ladder(agg, start, torch.ones(3, 3, dtype=torch.bool), dense, allc)
    cats = [c for _, c in points]
    assert len(set(cats)) == len(cats) and allc not in cats
    assert cats[-1] == tuple(tuple([S] * 4) for _ in range(3))  # the lowest threshold: every head's cheapest
    flops = [_flops(c) for c in cats]
    assert flops == sorted(flops)  # each point at least as cheap as the one before
    for t, c in points:  # every point is what the library's own decision gives for its thresholds
        per_layer = [dict(zip(SPARSE_CATEGORIES, row)) for row in t.tolist()]
        assert decide_categories(agg, per_layer) == [list(layer) for layer in c]
        assert bool((t >= 0).all() and (t <= 1).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bisection_finds_what_trying_every_point_finds(seed):
    """On a scorer monotone along every ladder, bisecting finds the same profile as scoring every point, in fewer
    evaluations; every trial's verdict is the scorer's own, no candidate is scored twice, and the chosen one is
    the cheapest feasible trial."""
    agg = synthetic_recall(seed=seed)
    total, dense_hits, budget = 100, 90, 4.0
    harm = monotone_harm(agg)
    results = {}
    for mode in ("bisect", "full"):
        calls = []
        config = TuneConfig(budget=budget, search=mode, max_evals=500)
        s = search(agg, PAIRS, harm_scorer(harm, total, dense_hits, calls), config, total, dense_hits)
        assert len(set(calls)) == len(calls) == len(s.trials)
        for t in s.trials:
            lost = sum(harm[layer, h].get(c, 0) for layer, row in enumerate(t.categories) for h, c in enumerate(row))
            assert t.feasible == (lost <= budget)  # budget 4 points of 100 prompts: 4 prompts
            assert t.attention_flop_reduction == pytest.approx(_flops(t.categories))
        best = s.best()
        assert best.feasible and best.attention_flop_reduction == max(
            t.attention_flop_reduction for t in s.trials if t.feasible)
        results[mode] = (best.categories, len(s.trials))
    assert results["bisect"][0] == results["full"][0]
    assert results["bisect"][1] < results["full"][1]


def test_global_bisection_costs_a_logarithm_of_the_ladder():
    agg = synthetic_recall(L=4, H=6, seed=3)
    total, dense_hits = 100, 90
    harm = monotone_harm(agg)
    points = ladder(agg, torch.full((4, 3), math.inf, dtype=torch.float64), torch.ones(4, 3, dtype=torch.bool),
                    torch.zeros(4, dtype=torch.bool), tuple(tuple([D] * 6) for _ in range(4)))
    # brute force along the global ladder: its cheapest feasible point
    feasible = [c for _, c in points if sum(harm[layer, h].get(x, 0) for layer, row in enumerate(c)
                                            for h, x in enumerate(row)) <= 2]
    s = search(agg, PAIRS, harm_scorer(harm, total, dense_hits), TuneConfig(budget=2.0, per_layer=False), total,
               dense_hits)
    glob = [t for t in s.trials if t.stage == "global"]
    assert len(glob) <= 1 + math.ceil(math.log2(len(points)))
    assert feasible and feasible[-1] in [t.categories for t in glob if t.feasible]


def test_per_layer_thresholds_separate_what_one_threshold_cannot():
    """Layer 0 head 0 must stay dense, with a higher recall than layer 1's harmless heads: one threshold per
    category keeps layer 1 dense too; per-layer thresholds make it sparse, and the profile needs version 2."""
    agg = torch.full((2, 3, 3), 0.99, dtype=torch.float64)
    agg[0, 0] = 0.7
    agg[1] = 0.6
    harm = {(0, 0): {X: 5, N: 5, S: 5}}
    total, dense_hits = 50, 45
    one = search(agg, PAIRS, harm_scorer(harm, total, dense_hits), TuneConfig(budget=0.0, per_layer=False), total,
                 dense_hits).best()
    assert one.categories == ((D, S, S), (D, D, D))
    per = search(agg, PAIRS, harm_scorer(harm, total, dense_hits), TuneConfig(budget=0.0), total, dense_hits).best()
    assert per.categories == ((D, S, S), (S, S, S)) and per.stage.startswith("layer 1")
    setting = per.threshold_setting()
    assert isinstance(setting, list) and len(setting) == 2
    info = blindsight.ModelInfo("qwen2_vl", 2, 3, 1, 8)
    scores = {"statistic": "recall", "categories": [c.json_name for c in SPARSE_CATEGORIES],
              "prompts": [{"sample": 0, "row": 0, "image_rows": 10, "recall": agg.tolist()}]}
    p = Profile(info, ((D,) * 3,) * 2, {"thresholds": 0.95, "quantile": 0.0, "dense_layers": []}, scores)
    tuned = p.decide(thresholds=setting)
    assert tuned.categories == per.categories
    d = tuned.to_dict()
    assert d["version"] == 2 and p.to_dict()["version"] == 1
    assert Profile.from_dict(json.loads(json.dumps(d))).decide().categories == per.categories
    # version and thresholds must agree, loudly
    bad = dict(d, version=1)
    with pytest.raises(ProfileFormatError, match="per-layer thresholds, which needs format version 2"):
        Profile.from_dict(bad)
    with pytest.raises(ProfileFormatError, match="version 2 is for per-layer"):
        Profile.from_dict(dict(p.to_dict(), version=2))
    with pytest.raises(ProfileFormatError, match="version 3 is not supported.*upgrade blindsight"):
        Profile.from_dict(dict(d, version=3))


def test_budget_arithmetic_early_stop_and_max_evals():
    agg = synthetic_recall(seed=4)
    seen = []

    def score(cats, max_misses, number, stage):
        seen.append(max_misses)
        return harm_scorer({(0, 0): {S: 3, N: 3, X: 3}}, 100, 88)(cats, max_misses, number, stage)

    # 1 point of 100 prompts: at most 1 prompt lost, so at least 87 right: at most 13 misses
    s = search(agg, PAIRS, score, TuneConfig(budget=1.0, max_evals=3), 100, 88)
    assert seen == [13] * 3 and len(s.trials) == 3 and s.stopped == "max_evals"
    stopped = [t for t in s.trials if not t.complete]
    assert stopped and all(not t.feasible and t.accuracy is None and t.scored == 14 for t in stopped)
    assert all(t.accuracy_bound == (t.hits + 100 - t.scored) / 100 for t in s.trials)
    seen.clear()
    search(agg, PAIRS, score, TuneConfig(budget=1.0, max_evals=2, early_stop=False), 100, 88)
    assert seen == [None, None]
    # 1 point of 50 prompts is half a prompt: none may be lost
    s = search(agg, PAIRS, harm_scorer({}, 50, 40), TuneConfig(budget=1.0, max_evals=1), 50, 40)
    assert s.min_hits == 40


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=-1.0), "budget must be accuracy points in \\[0, 100\\]"),
    (dict(budget=float("nan")), "budget"),
    (dict(budget=101), "budget"),
    (dict(budget=True), "budget"),
    (dict(search="greedy"), "search must be one of"),
    (dict(path="jit"), "path must be one of"),
    (dict(max_evals=0), "max_evals must be a positive int"),
    (dict(max_evals=2.0), "max_evals must be a positive int"),
    (dict(per_layer="yes"), "per_layer must be True or False"),
])
def test_config_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TuneConfig(**kwargs)


# ---- a tiny Qwen2-VL with a planted head that the task needs --------------------------------------------------------

HEAD_DIM = 16


def planted_model():
    """Layer 0: heads 0-2 attend to the query token itself (recall ~1 in every category: any category is
    harmless), head 3 attends uniformly (low recall) and its output is scaled up; layer 1 is random (low
    recall, near-uniform) with its output scaled up, so the last row reads what head 3 wrote into the image
    rows. Layer 1's image rows are read by nothing: its categories cannot change an answer."""
    model = build("qwen2_vl")
    lm = model.model.language_model
    att = lm.layers[0].self_attn
    d = HEAD_DIM
    with torch.no_grad():
        k = att.k_proj.weight.view(2, d, -1)
        k *= 8.0 / k.norm(dim=2, keepdim=True)
        att.k_proj.bias.zero_()
        att.q_proj.bias.zero_()
        for h in range(3):
            att.q_proj.weight[h * d:(h + 1) * d] = k[h // 2]
        att.q_proj.weight[3 * d:] = 0
        att.v_proj.weight[d:] *= 5  # kv head 1 (heads 2, 3); head 2 reads only itself, so only head 3 matters
        att.o_proj.weight[:, 3 * d:] *= 5
        lm.layers[1].self_attn.o_proj.weight *= 5
    return model


def planted_prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(2, 5, (1,), generator=g))
        texts = [int(x) for x in torch.randint(1, 4, (k + 1,), generator=g)]
        out.append(prompt("qwen2_vl", [(4, 4)] * k, texts, seed=1000 * seed + i))
    return out


def dense_answer_examples(model, prompts, limit):
    """Examples whose answer is the dense model's own greedy next token (a text token): dense accuracy 100%."""
    out = []
    with torch.no_grad():
        for p in prompts:
            answer = model(**p).logits[0, -1].argmax().view(1)
            if not 10 <= int(answer) < 250:
                continue
            n = p["input_ids"].shape[1]
            inputs = {"input_ids": torch.cat([p["input_ids"], answer[None]], 1),
                      "mm_token_type_ids": torch.cat([p["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], 1),
                      "pixel_values": p["pixel_values"], "image_grid_thw": p["image_grid_thw"]}
            out.append(Example(inputs, answer, n, n + 1))
            if len(out) == limit:
                break
    return out


def reference_accuracy(model, examples, profile):
    """Exact match with every head masked by its category's definition (tiny_models.reference_attention: eager
    SDPA with the reference mask), not BlindSight's lowering."""
    template = profile.template
    hits = 0
    with torch.no_grad():
        for ex in examples:
            layout = Layout.from_input_ids(ex.inputs["input_ids"], template)
            with reference_attention(model, layout, profile):
                pos = torch.arange(ex.prompt_len - 1, ex.length - 1)
                logits = model(**ex.inputs, logits_to_keep=pos).logits[0]
            hits += bool((logits.argmax(-1) == ex.answer_ids).all())
    return hits / len(examples)


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    profile = blindsight.calibrate(model, planted_prompts(6, 1), progress=False)
    holdout = dense_answer_examples(model, planted_prompts(40, 2), 24)
    assert len(holdout) == 24
    return model, profile, holdout


def _with(categories, layer, head, c):
    rows = [list(r) for r in categories]
    rows[layer][head] = c
    return rows


def test_planted_head_stays_dense_at_budget_zero(planted):
    model, profile, holdout = planted
    r = tune(model, profile, holdout, budget=0.0, progress=False)
    assert r.dense_accuracy == 1.0
    cats = r.profile.categories
    assert cats[0][3] == D, r.profile.summary()
    # the search found the rest: every other head sparse (layer 1 needed its own thresholds)
    assert all(c != D for (layer, h), c in _heads(cats) if (layer, h) != (0, 3)), r.profile.summary()
    assert isinstance(r.profile.calibration["thresholds"], list)
    # independently: the reference masks give the accuracy tune measured, and dropping head 3 in any category
    # would lose prompts, so DENSE was needed
    assert reference_accuracy(model, holdout, r.profile) == r.accuracy == 1.0
    for c in (X, N, S):
        dropped = Profile.from_categories(_with(cats, 0, 3, c), model)
        assert reference_accuracy(model, holdout, dropped) < 1.0, c
    # the accounting: tune's FLOP cut is the FLOP module's, for the chosen profile and every trial
    assert r.attention_flop_reduction == pytest.approx(flop_reductions(holdout, r.profile, model.config)[0])
    for t in r.trials:
        p = Profile.from_categories(t.categories, model)
        assert t.attention_flop_reduction == pytest.approx(flop_reductions(holdout, p, model.config)[0])
    assert len({t.categories for t in r.trials}) == len(r.trials)


def _heads(cats):
    return [((layer, h), c) for layer, row in enumerate(cats) for h, c in enumerate(row)]


def test_planted_head_may_drop_at_a_larger_budget(planted):
    """At a budget of what every head SINK loses (measured with the reference masks), the cheapest profile of
    all is feasible and chosen: head 3 is dropped."""
    model, profile, holdout = planted
    all_sink = Profile.uniform("sink", model)
    lost = 1.0 - reference_accuracy(model, holdout, all_sink)
    assert lost > 0
    r = tune(model, profile, holdout, budget=100 * lost, progress=False)
    assert r.profile.categories == all_sink.categories
    assert r.accuracy == pytest.approx(1.0 - lost)
    below = tune(model, profile, holdout, budget=100 * lost - 1e-6, progress=False, per_layer=False)
    assert below.profile.categories != all_sink.categories


def test_tuned_profile_records_how_it_was_chosen(planted, tmp_path, capsys):
    from blindsight.tools.cli import main

    model, profile, holdout = planted
    test = dense_answer_examples(model, planted_prompts(30, 3), 8)
    r = tune(model, profile, holdout, budget=0.0, test=test, progress=False, holdout_source="dev.jsonl",
             test_source="bench.jsonl", max_evals=6)
    rec = r.profile.calibration["tune"]
    assert rec["budget"] == 0.0 and rec["holdout"] == {"source": "dev.jsonl", "prompts": 24}
    assert rec["evaluations"] == len(r.trials) <= 6
    assert rec["accuracy_dense"] == 1.0 and rec["accuracy_chosen"] == r.accuracy
    assert rec["search"]["method"] == "bisect" and rec["search"]["max_evals"] == 6
    assert rec["given"]["accuracy"] == r.given.accuracy and r.given.stage == "given"
    t = rec["test"]
    assert t["prompts"] == 8 and t["accuracy_dense"] == 1.0
    assert t["accuracy_chosen"] == reference_accuracy(model, test, r.profile)
    assert t["accuracy_given"] == reference_accuracy(model, test, profile.decide())
    path = tmp_path / "tuned.json"
    r.profile.save(path)
    q = Profile.load(path)
    assert q.categories == r.profile.categories and q.decide().categories == r.profile.categories
    assert q.calibration["tune"] == json.loads(json.dumps(rec))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tuned (blindsight tune): budget 0.0 points on 24 held-out prompts (dev.jsonl)" in out
    assert "test split (bench.jsonl, 8 prompts)" in out and "thresholds: " in out


def test_compiled_path_scores_as_the_eager_one(planted):
    model, profile, holdout = planted
    same_length = dense_answer_examples(model, [prompt("qwen2_vl", [(4, 4)] * 3, [2, 1, 2, 3], seed=s)
                                                for s in range(20)], 3)
    kw = dict(budget=0.0, max_evals=1, progress=False)
    eager = tune(model, profile, same_length, **kw)
    compiled = tune(model, profile, same_length, path="compiled", **kw)
    torch._dynamo.reset()
    assert [t.hits for t in eager.trials] == [t.hits for t in compiled.trials] and compiled.trials[0].complete
    assert compiled.profile.calibration["tune"]["search"]["path"] == "compiled"


def test_bad_inputs_are_refused(planted):
    model, profile, holdout = planted
    with pytest.raises(HoldoutError, match="at least one holdout example"):
        tune(model, profile, [], progress=False)
    wrong = [Example(dict(e.inputs, input_ids=torch.cat([e.inputs["input_ids"][:, :-1],
                                                          (e.answer_ids - 1)[None]], 1)), e.answer_ids - 1,
                     e.prompt_len, e.length) for e in holdout[:4]]
    assert sum(accuracy(model, wrong)) == 0
    with pytest.raises(HoldoutError, match="answers none of the 4"):
        tune(model, profile, wrong, progress=False)
    with pytest.raises(ValueError, match="no calibration statistics|has none"):
        tune(model, Profile.uniform("dense", model), holdout, progress=False)
    blindsight.attach(model, profile)
    try:
        with pytest.raises(ValueError, match="detach"):
            tune(model, profile, holdout, progress=False)
    finally:
        blindsight.detach(model)
    with pytest.raises(ValueError, match="budget"):
        tune(model, profile, holdout, budget=-0.5, progress=False)
