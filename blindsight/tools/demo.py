"""``blindsight demo``: the shipped shapes model, calibrated, evaluated dense vs BlindSight, and timed.

1. Load the shipped model and processor (``from_pretrained`` on the package's ``zoo/shapes-qwen2vl``).
2. Calibrate on the ``calibration`` split (mixed 2-8 images) and draw the profile heatmap: the *fixed* profile,
   every category at ``threshold`` (0.95).
3. Tune (``blindsight.tune``) on the ``holdout`` split (8 images per prompt): the profile with the fewest
   attention FLOPs within ``budget`` points of dense on those prompts; draw its frontier.
4. Accuracy on the ``benchmark`` split (8 images per prompt, one layout length), apart from both: dense (eager
   SDPA, the reference) vs BlindSight (language model compiled with ``blindsight_backend``) with the fixed and
   the tuned profile; their attention and whole-prefill FLOP reductions on the benchmark's prompts.
5. Prefill time of one benchmark prompt's language model (its inputs captured from one full forward, so the
   vision tower is not timed), compiled by Inductor dense vs with BlindSight's defaults, warm, medians of
   ``20 * repeat`` alternating calls. At this length the cost model runs the attention dense (``not_faster``),
   so the ratio is ~1.0x; then the same language model on a longer synthetic prompt (``long_layout``), where it
   runs sparse.

Accuracy is measured with ``only_if_faster=False`` (every call sparse): it is sparse attention's accuracy
that is in question, whatever the cost model would choose at this length.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from .. import hf
from ..calibrate import calibrate
from ..fx import blindsight_backend
from ..layout import Layout, layout_from_ids, use_layout
from ..progress import alternating_medians, median_time
from ..scoring import Example, accuracy, by_task, compiled_language_model, flop_reductions
from ..stats import stats
from ..tune import points, tune
from ..zoo import MODEL_DIR, ShapesProcessor
from ..zoo.shapes import make_records
from .evaluate import make_examples

ZOO_MODEL = MODEL_DIR


@dataclass(frozen=True)
class DemoConfig:
    model: str = ZOO_MODEL
    calibration_samples: int = 32
    holdout_samples: int = 100
    benchmark_samples: int = 200
    benchmark_images: int = 8
    threshold: float = 0.95
    budget: float = 1.0
    repeat: int = 5
    long_layout: str = "text:64,(image:480,text:16)x16,text:80"
    png: str | None = "blindsight-profile.png"
    frontier_png: str | None = "blindsight-frontier.png"
    progress: bool = True

    def __post_init__(self):
        if self.calibration_samples < 1 or self.holdout_samples < 1 or self.benchmark_samples < 1:
            raise ValueError("calibration_samples, holdout_samples and benchmark_samples must be >= 1")
        if not 0 <= self.budget <= 100:
            raise ValueError(f"budget must be accuracy points in [0, 100], got {self.budget}")
        if not 2 <= self.benchmark_images <= 9:
            raise ValueError(f"benchmark_images must be in 2..9, got {self.benchmark_images}")
        if self.repeat < 1:
            raise ValueError("repeat must be >= 1")


def load_zoo_model(path: str = ZOO_MODEL):
    """The shipped model (float32, SDPA attention, eval mode) and its processor."""
    from transformers import Qwen2VLForConditionalGeneration

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no trained model there; train one with "
                                f"`python -m blindsight.zoo.train --out {path}`")
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), ShapesProcessor.from_pretrained(path)


def _language_model_inputs(model, ex: Example) -> dict:
    """The keyword arguments ``model``'s language model gets in a forward of ``ex`` (image features merged)."""
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs, past_key_values=None, use_cache=False)  # each timed call a fresh prefill

    handle = hf.language_model(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**ex.inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return captured


def _alternating_prefill_times(model, ex: Example, profile, repeat: int) -> tuple[float, float]:
    """(dense, BlindSight) prefill times of ``ex``'s language model, compiled by Inductor dense and with
    ``blindsight_backend(profile)``'s defaults: after two warm calls of each, ``20 * repeat`` rounds each time one
    call of either in turn, and the medians of the rounds are returned. Two ~8 ms calls differ by less than this
    machine drifts over a measurement (up to ~30% here), so the drift must fall on both alike and the medians
    need many rounds: with 5 rounds the ratio wandered over 0.92-1.13 for the same code."""
    import contextlib

    lm = hf.language_model(model)
    original = lm.forward
    kwargs = _language_model_inputs(model, ex)  # captured from an uncompiled forward
    layout = layout_from_ids(ex.inputs["input_ids"], profile.template)
    forwards = {"dense": torch.compile(original, backend="inductor", dynamic=False),
                "blindsight": torch.compile(original, backend=blindsight_backend(profile), dynamic=False)}

    def once(name):
        lm.forward = forwards[name]
        with torch.no_grad(), use_layout(layout) if name == "blindsight" else contextlib.nullcontext():
            lm(**kwargs)

    before = _decided_calls()
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            t = alternating_medians({name: lambda name=name: once(name) for name in forwards}, 20 * repeat, 2)
    finally:
        lm.forward = original
    if _decided_calls() == before:
        raise RuntimeError("the timed BlindSight prefill ran no sparse attention; check the profile and backend "
                           "options")
    return t["dense"], t["blindsight"]


def _decided_calls() -> int:
    """Attention calls that ran sparse, or dense because the cost model predicted no gain."""
    s = stats()
    return s.get("sparse_calls", 0) + s.get("fallback.not_faster", 0)


def _long_prefill(model, profile, spec: str, repeat: int) -> dict:
    """The language model alone on a longer synthetic prompt (``spec``, random embeddings), compiled dense vs
    with BlindSight's defaults: where the cost model lets sparse attention run."""
    layout = Layout.from_spec(spec, profile.template)
    lm = hf.language_model(model)
    emb = torch.randn(1, layout.seq_len, model.config.text_config.hidden_size,
                      generator=torch.Generator().manual_seed(0))
    times = {}
    for name, backend in (("dense", "inductor"), ("blindsight", blindsight_backend(profile))):
        torch._dynamo.reset()
        compiled = torch.compile(lm, backend=backend, dynamic=False)
        before = stats().get("sparse_calls", 0)
        with torch.no_grad(), use_layout(layout):
            times[name] = median_time(lambda c=compiled: c(inputs_embeds=emb, use_cache=False), repeat)
        if name == "blindsight":
            times["sparse_calls"] = stats().get("sparse_calls", 0) - before
    return {"long_prompt_tokens": layout.seq_len, "long_prefill_ms_dense": 1e3 * times["dense"],
            "long_prefill_ms_blindsight": 1e3 * times["blindsight"],
            "long_prefill_speedup": times["dense"] / times["blindsight"],
            "long_prefill_sparse": times["sparse_calls"] > 0}


def _sparse_accuracy(model, examples: list[Example], profile, progress: bool, desc: str) -> list[bool]:
    """Exact match with the language model compiled with ``blindsight_backend(profile)``, every call sparse."""
    with compiled_language_model(model, blindsight_backend(profile, only_if_faster=False)):
        return accuracy(model, examples, profile.template, progress, desc=desc)


def run_demo(cfg: DemoConfig = DemoConfig()) -> dict:
    """The whole demo (see the module docstring); the numbers ``format_report`` prints."""
    t0 = time.time()
    model, processor = load_zoo_model(cfg.model)
    cal = [dict(processor(text=[r["text"]], images=r["images"]))
           for r in make_records("calibration", cfg.calibration_samples)]
    profile = calibrate(model, cal, thresholds=cfg.threshold, progress=cfg.progress,
                        source=f"blindsight.zoo.shapes calibration split, {cfg.calibration_samples} prompts")
    if cfg.png:
        from .viz import plot_profile

        plot_profile(profile, cfg.png)
    k = cfg.benchmark_images
    holdout = make_examples(processor, make_records("holdout", cfg.holdout_samples, min_images=k, max_images=k),
                            "qwen2_vl", pad_to=1)
    t_tune = time.time()
    tuned = tune(model, profile, holdout, budget=cfg.budget, progress=cfg.progress,
                 holdout_source=f"blindsight.zoo.shapes holdout split, {cfg.holdout_samples} prompts x {k} images")
    t_tune = time.time() - t_tune
    if cfg.frontier_png:
        from .viz import plot_frontier

        plot_frontier(tuned, cfg.frontier_png)
    records = make_records("benchmark", cfg.benchmark_samples, min_images=k, max_images=k)
    examples = make_examples(processor, records, "qwen2_vl", pad_to=1)
    dense_hits = accuracy(model, examples, progress=cfg.progress, desc="dense accuracy")
    sparse_hits = _sparse_accuracy(model, examples, profile, cfg.progress, "blindsight accuracy (fixed)")
    tuned_hits = _sparse_accuracy(model, examples, tuned.profile, cfg.progress, "blindsight accuracy (tuned)")
    before = stats().get("fallback.not_faster", 0)
    t_dense, t_sparse = _alternating_prefill_times(model, examples[0], profile, cfg.repeat)
    ran_dense = stats().get("fallback.not_faster", 0) > before
    att, pre = flop_reductions(examples, profile, model.config)
    tuned_att, tuned_pre = flop_reductions(examples, tuned.profile, model.config)
    n = len(examples)
    return {
        "model": cfg.model,
        "profile": {c.json_name: k for c, k in profile.counts().items()},
        "profile_summary": profile.summary(),
        "benchmark": f"{n} prompts x {cfg.benchmark_images} images, {examples[0].prompt_len} prompt tokens",
        "threshold": cfg.threshold,
        "attention_flop_reduction": att,
        "prefill_flop_reduction": pre,
        "accuracy_dense": sum(dense_hits) / n,
        "accuracy_blindsight": sum(sparse_hits) / n,
        "accuracy_by_task": {"dense": by_task(examples, dense_hits), "blindsight": by_task(examples, sparse_hits),
                             "tuned": by_task(examples, tuned_hits)},
        "tuned": {
            "budget": cfg.budget,
            "profile": {c.json_name: k for c, k in tuned.profile.counts().items()},
            "thresholds": tuned.profile.calibration["thresholds"],
            "holdout": f"{len(holdout)} prompts x {k} images",
            "holdout_accuracy_dense": tuned.dense_accuracy,
            # the fixed profile's held-out accuracy; None when its evaluation stopped early (then at most ..._bound)
            "holdout_accuracy_fixed": tuned.given.accuracy,
            "holdout_accuracy_fixed_bound": tuned.given.accuracy_bound,
            "holdout_accuracy_tuned": tuned.accuracy,
            "attention_flop_reduction": tuned_att,
            "prefill_flop_reduction": tuned_pre,
            "accuracy_blindsight": sum(tuned_hits) / n,
            "evaluations": tuned.evaluations,
            "seconds": t_tune,
            "frontier_png": cfg.frontier_png,
        },
        "prefill_ms_dense": 1e3 * t_dense,
        "prefill_ms_blindsight": 1e3 * t_sparse,
        "prefill_speedup": t_dense / t_sparse,
        "prefill_attention": "dense (cost model: not faster)" if ran_dense else "sparse",
        **_long_prefill(model, profile, cfg.long_layout, cfg.repeat),
        "png": cfg.png,
        "seconds": time.time() - t0,
    }


def format_report(r: dict) -> str:
    t = r["tuned"]

    def heads(counts):
        return "/".join(str(v) for v in counts.values())

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    fixed_holdout = pct(t["holdout_accuracy_fixed"]) if t["holdout_accuracy_fixed"] is not None else \
        f"<={pct(t['holdout_accuracy_fixed_bound'])}"
    lines = [r["profile_summary"], f"benchmark: {r['benchmark']}; tuned on the holdout split ({t['holdout']}), "
             f"budget {points(t['budget'])}",
             f"{'':<16}{'heads d/x/i/s':>14}{'attention FLOPs':>17}{'prefill FLOPs':>15}{'held-out':>10}"
             f"{'benchmark':>11}",
             f"{'dense':<16}{str(sum(r['profile'].values())) + '/0/0/0':>14}{'0%':>17}{'0%':>15}"
             f"{pct(t['holdout_accuracy_dense']):>10}{pct(r['accuracy_dense']):>11}",
             f"{'fixed @' + format(r['threshold'], 'g'):<16}{heads(r['profile']):>14}"
             f"{-100 * r['attention_flop_reduction']:>16.1f}%{-100 * r['prefill_flop_reduction']:>14.1f}%"
             f"{fixed_holdout:>10}{pct(r['accuracy_blindsight']):>11}",
             f"{'tuned':<16}{heads(t['profile']):>14}{-100 * t['attention_flop_reduction']:>16.1f}%"
             f"{-100 * t['prefill_flop_reduction']:>14.1f}%{pct(t['holdout_accuracy_tuned']):>10}"
             f"{pct(t['accuracy_blindsight']):>11}",
             f"(tuned in {t['seconds']:.0f} s, {t['evaluations']} evaluations of the held-out prompts)",
             f"{'task':<8}{'dense':>8}{'fixed':>8}{'tuned':>8}"]
    by = r["accuracy_by_task"]
    for task, acc in by["dense"].items():
        lines.append(f"{task:<8}{100 * acc:>7.1f}%{100 * by['blindsight'][task]:>7.1f}%"
                     f"{100 * by['tuned'][task]:>7.1f}%")
    lines.append(f"prefill (compiled language model alone, fixed profile): dense {r['prefill_ms_dense']:.1f} ms, "
                 f"BlindSight {r['prefill_ms_blindsight']:.1f} ms ({r['prefill_speedup']:.2f}x; attention ran "
                 f"{r['prefill_attention']})")
    lines.append(f"longer prompt ({r['long_prompt_tokens']} tokens, synthetic): dense "
                 f"{r['long_prefill_ms_dense']:.1f} ms, BlindSight {r['long_prefill_ms_blindsight']:.1f} ms "
                 f"({r['long_prefill_speedup']:.2f}x; attention ran "
                 f"{'sparse' if r['long_prefill_sparse'] else 'dense (cost model: not faster)'})")
    if r["png"]:
        lines.append(f"profile heatmap written to {r['png']}")
    if t["frontier_png"]:
        lines.append(f"tuning frontier written to {t['frontier_png']}")
    lines.append(f"({r['seconds']:.0f} s in all)")
    return "\n".join(lines)
