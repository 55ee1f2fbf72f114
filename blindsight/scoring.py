"""Exact-match scoring of a VLM on question-answer examples, dense or with BlindSight (the evaluator's core).

Exact match: greedy decoding continues the prompt with exactly the answer's tokens. It is checked in one
teacher-forced forward over ``prompt + answer``: greedy decoding yields the answer iff, at every answer
position, the argmax given the answer's previous tokens is the answer's next token.

:func:`accuracy` scores a model as it is: plain (dense), attached (``blindsight.attach``) or with its language
model compiled (:func:`compiled_language_model`). With a template each forward runs under its prompt's layout
and must have run sparse attention. ``blindsight eval`` (:mod:`blindsight.tools.evaluate`), ``blindsight tune``
and the demo score with it; :mod:`blindsight.tools.evaluate` turns prompt files into :class:`Example` s.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from . import hf
from .categories import Category
from .flops import prefill_flops
from .layout import Layout, use_layout
from .masks.block import pair_counts
from .profile import Profile
from .progress import progress_bar
from .stats import stats
from .template import Template

__all__ = ["Example", "correct", "accuracy", "compiled_language_model", "by_task", "flop_reductions",
           "category_pairs"]


@dataclass
class Example:
    """One prompt + answer, ready for a teacher-forced forward (batch of one)."""

    inputs: dict  # input_ids etc. of prompt + answer (+ right padding)
    answer_ids: torch.Tensor  # [n]
    prompt_len: int
    length: int  # prompt + answer, before padding
    task: str | None = None


@contextlib.contextmanager
def compiled_language_model(model, backend, **compile_kwargs):
    """Inside the block the model's language model runs ``torch.compile``d with ``backend`` (static shapes)."""
    lm = hf.language_model(model)
    original = lm.forward
    lm.forward = torch.compile(original, backend=backend, dynamic=False, **compile_kwargs)
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            yield model
    finally:
        lm.forward = original


def correct(model, ex: Example) -> bool:
    """Does greedy decoding continue ``ex``'s prompt with exactly its answer? (One teacher-forced forward.)"""
    pos = torch.arange(ex.prompt_len - 1, ex.prompt_len - 1 + ex.answer_ids.numel())
    logits = model(**ex.inputs, logits_to_keep=pos).logits[0]
    return bool((logits.argmax(-1) == ex.answer_ids.to(logits.device)).all())


def accuracy(model, examples: list[Example], template: Template | None = None, progress: bool = False,
             desc: str = "dense", max_misses: int | None = None, on_example=None) -> list[bool]:
    """Per-example exact match. With ``template``: each forward runs under its layout and must run sparse.

    ``max_misses``: stop after the first example that makes the misses exceed it (the list returned is then
    shorter than ``examples``). ``on_example(hit)`` is called after each example (progress displays)."""
    hits = []
    with torch.no_grad():
        for ex in progress_bar(examples, progress, desc):
            if template is None:
                hits.append(correct(model, ex))
            else:
                layout = Layout.from_input_ids(ex.inputs["input_ids"], template)
                before = stats().get("sparse_calls", 0)
                with use_layout(layout):
                    hits.append(correct(model, ex))
                if layout.num_images.sum() and stats().get("sparse_calls", 0) == before:
                    falls = {k: v for k, v in stats().items() if k.startswith("fallback.")}
                    raise RuntimeError(f"BlindSight ran no sparse attention on an example with images (fallbacks so "
                                       f"far: {falls}); its accuracy would be the dense one. Check the profile and "
                                       "backend options.")
            if on_example is not None:
                on_example(hits[-1])
            if max_misses is not None and len(hits) - sum(hits) > max_misses:
                break
    return hits


def by_task(examples: list[Example], hits: list[bool]) -> dict[str, float]:
    tasks = sorted({e.task for e in examples if e.task})
    return {t: sum(h for e, h in zip(examples, hits) if e.task == t) / sum(e.task == t for e in examples)
            for t in tasks}


def _prompt_layout(ex: Example, template: Template) -> Layout:
    return Layout.from_input_ids(ex.inputs["input_ids"][:, :ex.prompt_len], template)


def flop_reductions(examples: list[Example], profile: Profile, config) -> tuple[float, float]:
    """(attention, whole-prefill) FLOP reduction summed over the examples' prompts (padding excluded)."""
    template = Template.from_dict(profile.model.template)
    att_d = att_b = pre_d = pre_b = 0
    for ex in examples:
        p = prefill_flops(_prompt_layout(ex, template), profile, config)
        att_d, att_b = att_d + p.attention.dense, att_b + p.attention.blindsight
        pre_d, pre_b = pre_d + p.dense, pre_b + p.blindsight
    return 1 - att_b / att_d, 1 - pre_b / pre_d


def category_pairs(examples: list[Example], template: Template) -> dict[Category, int]:
    """Kept (query, key) pairs of one head of each category, summed over the examples' prompts (padding
    excluded): a profile's attention FLOPs are ``4 * head_dim`` times the sum of its heads' entries."""
    out = {c: 0 for c in Category}
    for ex in examples:
        for c, t in pair_counts(_prompt_layout(ex, template), list(Category)).items():
            out[c] += int(t.sum())
    return out
