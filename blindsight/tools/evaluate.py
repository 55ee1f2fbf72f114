"""Accuracy of a VLM dense vs with BlindSight, on multi-image question answering.

Exact match: greedy decoding continues the prompt with exactly the answer's tokens. It is checked in one
teacher-forced forward over ``prompt + answer``: greedy decoding yields the answer iff, at every answer
position, the argmax given the answer's previous tokens is the answer's next token.

Dense accuracy runs the model eagerly with SDPA (the reference). BlindSight accuracy runs what users run: the
language model compiled with ``blindsight_backend(profile)`` (``dynamic=False``), the layout of each prompt
given with :func:`blindsight.use_layout`; the vision tower runs eagerly in both, as it holds no
language-model attention. Prompts are right-padded to a multiple of ``pad_to`` tokens so that a file with many
lengths compiles a few graphs, not one per length: the padding comes after the answer and the model is causal,
so it changes no logit that is read. A BlindSight forward that ran no sparse attention call raises instead of
counting a dense answer as a sparse one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .. import hf
from ..flops import prefill_flops
from ..fx import blindsight_backend
from ..layout import Layout, use_layout
from ..profile import Profile
from ..progress import progress_bar
from ..stats import stats
from ..template import Template

__all__ = ["Example", "make_examples", "jsonl_examples", "accuracy", "compiled_language_model",
           "EvalResult", "evaluate"]


@dataclass
class Example:
    """One prompt + answer, ready for a teacher-forced forward (batch of one)."""

    inputs: dict  # input_ids etc. of prompt + answer (+ right padding)
    answer_ids: torch.Tensor  # [n]
    prompt_len: int
    length: int  # prompt + answer, before padding
    task: str | None = None


def _type_key(inputs: dict) -> str | None:
    return next((k for k in ("mm_token_type_ids", "token_type_ids") if k in inputs), None)


def make_examples(processor, records, model_type: str, pad_to: int = 64, pad_id: int = 0) -> list[Example]:
    """Examples from records with in-memory images (``images``: PIL images, ``text`` with ``<image>``, ``answer``)."""
    from .data import IMAGE_MARKER, image_marker

    marker = image_marker(processor, model_type)
    tokenizer = getattr(processor, "tokenizer", processor)
    out = []
    for rec in records:
        enc = dict(processor(text=[rec["text"].replace(IMAGE_MARKER, marker)], images=rec["images"] or None,
                             return_tensors="pt"))
        ans = torch.tensor(tokenizer(rec["answer"], add_special_tokens=False)["input_ids"], dtype=torch.long)
        if ans.numel() == 0:
            raise ValueError(f"answer {rec['answer']!r} gives no tokens")
        ids = enc["input_ids"]
        n, total = ids.shape[1], ids.shape[1] + ans.numel()
        padded = -(-total // pad_to) * pad_to if pad_to > 1 else total
        tail = torch.cat([ans, torch.full((padded - total,), pad_id, dtype=torch.long)])[None]
        enc["input_ids"] = torch.cat([ids, tail], dim=1)
        enc.pop("attention_mask", None)  # right padding after the answer: causal attention needs no mask
        key = _type_key(enc)
        if key:
            enc[key] = torch.cat([enc[key], torch.zeros_like(tail)], dim=1)
        out.append(Example(enc, ans, n, total, rec.get("task")))
    return out


def jsonl_examples(path, processor, model_type: str, limit: int | None = None, pad_to: int = 64, pad_id: int = 0):
    """Examples from a JSONL QA file (``images``, ``text`` with ``<image>``, ``answer``); DataError names the line."""
    from .data import jsonl_records, open_images

    records = []
    for lineno, rec in jsonl_records(path, require_answer=True):
        if limit is not None and len(records) >= limit:
            break
        records.append(dict(rec, images=open_images(rec["images"], f"{path}, line {lineno}")))
    return make_examples(processor, records, model_type, pad_to, pad_id)


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


def _correct(model, ex: Example) -> bool:
    pos = torch.arange(ex.prompt_len - 1, ex.prompt_len - 1 + ex.answer_ids.numel())
    logits = model(**ex.inputs, logits_to_keep=pos).logits[0]
    return bool((logits.argmax(-1) == ex.answer_ids.to(logits.device)).all())


def accuracy(model, examples: list[Example], template: Template | None = None, progress: bool = False,
             desc: str = "dense") -> list[bool]:
    """Per-example exact match. With ``template``: each forward runs under its layout and must run sparse."""
    hits = []
    with torch.no_grad():
        for ex in progress_bar(examples, progress, desc):
            if template is None:
                hits.append(_correct(model, ex))
                continue
            layout = Layout.from_input_ids(ex.inputs["input_ids"], template)
            before = stats().get("sparse_calls", 0)
            with use_layout(layout):
                hits.append(_correct(model, ex))
            if layout.num_images.sum() and stats().get("sparse_calls", 0) == before:
                falls = {k: v for k, v in stats().items() if k.startswith("fallback.")}
                raise RuntimeError(f"BlindSight ran no sparse attention on an example with images (fallbacks so far: "
                                   f"{falls}); its accuracy would be the dense one. Check the profile and backend "
                                   "options.")
    return hits


@dataclass
class EvalResult:
    threshold: float | None
    accuracy: float
    attention_flop_reduction: float
    prefill_flop_reduction: float
    categories: dict = field(default_factory=dict)
    by_task: dict = field(default_factory=dict)


def by_task(examples: list[Example], hits: list[bool]) -> dict[str, float]:
    tasks = sorted({e.task for e in examples if e.task})
    return {t: sum(h for e, h in zip(examples, hits) if e.task == t) / sum(e.task == t for e in examples)
            for t in tasks}


def flop_reductions(examples: list[Example], profile: Profile, config) -> tuple[float, float]:
    """(attention, whole-prefill) FLOP reduction summed over the examples' prompts (padding excluded)."""
    template = Template.from_dict(profile.model.template)
    att_d = att_b = pre_d = pre_b = 0
    for ex in examples:
        layout = Layout.from_input_ids(ex.inputs["input_ids"][:, :ex.prompt_len], template)
        p = prefill_flops(layout, profile, config)
        att_d, att_b = att_d + p.attention.dense, att_b + p.attention.blindsight
        pre_d, pre_b = pre_d + p.dense, pre_b + p.blindsight
    return 1 - att_b / att_d, 1 - pre_b / pre_d


def evaluate(model, examples: list[Example], profile: Profile, thresholds=(None,), progress: bool = True,
             **backend_options) -> tuple[float, list[EvalResult]]:
    """Dense accuracy, then for each threshold (None: the profile as decided) BlindSight's accuracy and FLOPs."""
    if not examples:
        raise ValueError("evaluate needs at least one example")
    profile.check_model(model)
    dense_hits = accuracy(model, examples, progress=progress, desc="dense")
    dense = sum(dense_hits) / len(examples)
    results = []
    for t in thresholds:
        p = profile if t is None else profile.decide(thresholds=t)
        template = Template.from_dict(p.model.template)
        # accuracy of sparse attention: every call sparse, whatever the cost model would pick at this length
        options = {"only_if_faster": False, **backend_options}
        with compiled_language_model(model, blindsight_backend(p, **options)):
            hits = accuracy(model, examples, template, progress, desc=f"blindsight{'' if t is None else f' @{t}'}")
        att, pre = flop_reductions(examples, p, model.config)
        results.append(EvalResult(t, sum(hits) / len(examples), att, pre,
                                  {c.json_name: n for c, n in p.counts().items()}, by_task(examples, hits)))
    return dense, results
