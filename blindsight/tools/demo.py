"""``blindsight demo``: the shipped shapes model, calibrated, evaluated dense vs BlindSight, and timed.

1. Load the shipped model and processor (``from_pretrained`` on the package's ``zoo/shapes-qwen2vl``).
2. Calibrate on the ``calibration`` split (mixed 2-8 images) and draw the profile heatmap.
3. Accuracy on the held-out ``benchmark`` split (8 images per prompt, one layout length): dense (eager SDPA,
   the reference) vs BlindSight (language model compiled with ``blindsight_backend``).
4. Attention and whole-prefill FLOP reductions on the benchmark's prompts.
5. Prefill time of one benchmark prompt's language model (its inputs captured from one full forward, so the
   vision tower is not timed), compiled by Inductor dense vs with BlindSight's defaults, warm, median of
   ``repeat`` runs. At this length the cost model runs the attention dense (``not_faster``), so the ratio
   is ~1.0x; then the same language model on a longer synthetic prompt (``long_layout``), where it runs sparse.

Accuracy is measured with ``only_if_faster=False`` (every call sparse): it is sparse attention's accuracy
that is in question, whatever the cost model would choose at this length.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch

from .. import hf
from ..calibrate import calibrate
from ..fx import blindsight_backend
from ..layout import Layout, layout_from_ids, use_layout
from ..progress import median_time
from ..stats import stats
from ..template import Template
from ..zoo import MODEL_DIR, ShapesProcessor
from ..zoo.shapes import make_records
from .evaluate import Example, accuracy, by_task, compiled_language_model, flop_reductions, make_examples

ZOO_MODEL = MODEL_DIR


@dataclass(frozen=True)
class DemoConfig:
    model: str = ZOO_MODEL
    calibration_samples: int = 32
    benchmark_samples: int = 200
    benchmark_images: int = 8
    threshold: float = 0.95
    repeat: int = 5
    long_layout: str = "text:64,(image:480,text:16)x16,text:80"
    png: str | None = "blindsight-profile.png"
    progress: bool = True

    def __post_init__(self):
        if self.calibration_samples < 1 or self.benchmark_samples < 1:
            raise ValueError("calibration_samples and benchmark_samples must be >= 1")
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


def _prefill_time(model, ex: Example, template: Template | None, repeat: int) -> float:
    """Median time of the language model's prefill of ``ex``. The vision tower, the same eager code either way,
    is left out so the ratio is the language model's (it was ~5 ms of ~15 ms for an 8-image prompt here). The
    language model alone sees no ``input_ids``, so its layout is given with ``use_layout``, from the
    content-memoized ``layout_from_ids`` that the run time itself uses: a prompt this short never needs one
    (the run time decides from its length that no call can gain and runs the dense graph), and a new prompt's
    layout (~0.4 ms at 339 tokens) is what ``blindsight bench`` reports as layout overhead. With ``template``,
    raises if the timed calls were neither sparse nor run dense by the cost model (``not_faster``): a
    misconfigured run."""
    import contextlib

    def layout():
        if template is None:
            return contextlib.nullcontext()
        return use_layout(layout_from_ids(ex.inputs["input_ids"], template))

    lm = hf.language_model(model)
    with layout():  # the capturing forward runs the compiled language model too
        kwargs = _language_model_inputs(model, ex)

    def once():
        with torch.no_grad(), layout():
            return lm(**kwargs)

    before = _decided_calls()
    t = median_time(once, repeat)
    if template is not None and _decided_calls() == before:
        raise RuntimeError("the timed BlindSight prefill ran no sparse attention; check the profile and backend "
                           "options")
    return t


def _alternating_prefill_times(model, ex: Example, profile, repeat: int) -> tuple[float, float]:
    """(dense, BlindSight) prefill times of ``ex``'s language model, compiled by Inductor dense and with
    ``blindsight_backend(profile)``'s defaults: ``repeat`` rounds, each timing one of either in turn (each a
    median of one call after two warm ones), and the median of the rounds, so that this machine's drift over
    the measurement (up to ~30% here) falls on both alike."""
    lm = hf.language_model(model)
    original = lm.forward
    forwards = {None: torch.compile(original, backend="inductor", dynamic=False),
                profile.template: torch.compile(original, backend=blindsight_backend(profile), dynamic=False)}
    times: dict = {template: [] for template in forwards}
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            for _ in range(repeat):
                for template, forward in forwards.items():
                    lm.forward = forward
                    times[template].append(_prefill_time(model, ex, template, 1))
    finally:
        lm.forward = original
    return statistics.median(times[None]), statistics.median(times[profile.template])


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
    records = make_records("benchmark", cfg.benchmark_samples, min_images=cfg.benchmark_images,
                           max_images=cfg.benchmark_images)
    examples = make_examples(processor, records, "qwen2_vl", pad_to=1)
    dense_hits = accuracy(model, examples, progress=cfg.progress, desc="dense accuracy")
    template = Template.from_dict(profile.model.template)
    with compiled_language_model(model, blindsight_backend(profile, only_if_faster=False)):
        sparse_hits = accuracy(model, examples, template, cfg.progress, desc="blindsight accuracy")
    before = stats().get("fallback.not_faster", 0)
    t_dense, t_sparse = _alternating_prefill_times(model, examples[0], profile, cfg.repeat)
    ran_dense = stats().get("fallback.not_faster", 0) > before
    att, pre = flop_reductions(examples, profile, model.config)
    n = len(examples)
    return {
        "model": cfg.model,
        "profile": {c.json_name: k for c, k in profile.counts().items()},
        "profile_summary": profile.summary(),
        "benchmark": f"{n} prompts x {cfg.benchmark_images} images, {examples[0].prompt_len} prompt tokens",
        "attention_flop_reduction": att,
        "prefill_flop_reduction": pre,
        "accuracy_dense": sum(dense_hits) / n,
        "accuracy_blindsight": sum(sparse_hits) / n,
        "accuracy_by_task": {"dense": by_task(examples, dense_hits), "blindsight": by_task(examples, sparse_hits)},
        "prefill_ms_dense": 1e3 * t_dense,
        "prefill_ms_blindsight": 1e3 * t_sparse,
        "prefill_speedup": t_dense / t_sparse,
        "prefill_attention": "dense (cost model: not faster)" if ran_dense else "sparse",
        **_long_prefill(model, profile, cfg.long_layout, cfg.repeat),
        "png": cfg.png,
        "seconds": time.time() - t0,
    }


def format_report(r: dict) -> str:
    lines = [r["profile_summary"], f"benchmark: {r['benchmark']}",
             f"attention FLOPs -{100 * r['attention_flop_reduction']:.1f}%, whole prefill FLOPs "
             f"-{100 * r['prefill_flop_reduction']:.1f}%",
             f"{'task':<8}{'dense':>8}{'blindsight':>12}"]
    for task, acc in r["accuracy_by_task"]["dense"].items():
        lines.append(f"{task:<8}{100 * acc:>7.1f}%{100 * r['accuracy_by_task']['blindsight'][task]:>11.1f}%")
    lines.append(f"{'all':<8}{100 * r['accuracy_dense']:>7.1f}%{100 * r['accuracy_blindsight']:>11.1f}%")
    lines.append(f"prefill (compiled language model alone): dense {r['prefill_ms_dense']:.1f} ms, BlindSight "
                 f"{r['prefill_ms_blindsight']:.1f} ms ({r['prefill_speedup']:.2f}x; attention ran "
                 f"{r['prefill_attention']})")
    lines.append(f"longer prompt ({r['long_prompt_tokens']} tokens, synthetic): dense "
                 f"{r['long_prefill_ms_dense']:.1f} ms, BlindSight {r['long_prefill_ms_blindsight']:.1f} ms "
                 f"({r['long_prefill_speedup']:.2f}x; attention ran "
                 f"{'sparse' if r['long_prefill_sparse'] else 'dense (cost model: not faster)'})")
    if r["png"]:
        lines.append(f"profile heatmap written to {r['png']}")
    lines.append(f"({r['seconds']:.0f} s in all)")
    return "\n".join(lines)
