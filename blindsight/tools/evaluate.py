"""Accuracy of a VLM dense vs with BlindSight, on multi-image question answering.

Exact match (:mod:`blindsight.scoring`): greedy decoding continues the prompt with exactly the answer's tokens,
checked in one teacher-forced forward over ``prompt + answer``.

Dense accuracy runs the model eagerly with SDPA (the reference). BlindSight accuracy runs what users run: the
language model compiled with ``blindsight_backend(profile)`` (``dynamic=False``), the layout of each prompt
given with :func:`blindsight.use_layout`; the vision tower runs eagerly in both, as it holds no
language-model attention. Prompts are right-padded to a multiple of ``pad_to`` tokens so that a file with many
lengths compiles a few graphs, not one per length: the padding comes after the answer and the model is causal,
so it changes no logit that is read. A BlindSight forward that ran no sparse attention call raises instead of
counting a dense answer as a sparse one.

A prompt file is checked line by line: a record this model's processor or vocabulary cannot take (a file
for another model) is a :class:`~blindsight.tools.data.DataError` naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..fx import blindsight_backend
from ..profile import Profile
from ..scoring import Example, accuracy, by_task, compiled_language_model, flop_reductions
from ..template import Template

__all__ = ["Example", "make_examples", "jsonl_examples", "accuracy", "compiled_language_model",
           "EvalResult", "evaluate", "by_task", "flop_reductions"]


def _type_key(inputs: dict) -> str | None:
    return next((k for k in ("mm_token_type_ids", "token_type_ids") if k in inputs), None)


def make_examples(processor, records, model_type: str, pad_to: int = 64, pad_id: int = 0) -> list[Example]:
    """Examples from records with in-memory images (``images``: PIL images, ``text`` with ``<image>``, ``answer``).
    ValueError for a record the processor refuses or whose answer (or prompt) the vocabulary does not hold."""
    from .data import image_marker

    marker = image_marker(processor, model_type)
    return [_example(processor, marker, rec, pad_to, pad_id) for rec in records]


def _example(processor, marker: str, rec: dict, pad_to: int, pad_id: int) -> Example:
    from .data import IMAGE_MARKER

    tokenizer = getattr(processor, "tokenizer", processor)
    enc = dict(processor(text=[rec["text"].replace(IMAGE_MARKER, marker)], images=rec["images"] or None,
                         return_tensors="pt"))
    ans = torch.tensor(tokenizer(rec["answer"], add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ans.numel() == 0:
        raise ValueError(f"answer {rec['answer']!r} gives no tokens")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and bool((ans == unk).any()):
        raise ValueError(f"answer {rec['answer']!r} is not in this model's vocabulary (it gives the unknown token)")
    if unk is not None and bool((enc["input_ids"] == unk).any()):
        raise ValueError("the prompt has words outside this model's vocabulary (they give the unknown token)")
    ids = enc["input_ids"]
    n, total = ids.shape[1], ids.shape[1] + ans.numel()
    padded = -(-total // pad_to) * pad_to if pad_to > 1 else total
    tail = torch.cat([ans, torch.full((padded - total,), pad_id, dtype=torch.long)])[None]
    enc["input_ids"] = torch.cat([ids, tail], dim=1)
    enc.pop("attention_mask", None)  # right padding after the answer: causal attention needs no mask
    key = _type_key(enc)
    if key:
        enc[key] = torch.cat([enc[key], torch.zeros_like(tail)], dim=1)
    return Example(enc, ans, n, total, rec.get("task"))


def jsonl_examples(path, processor, model_type: str, limit: int | None = None, pad_to: int = 64, pad_id: int = 0):
    """Examples from a JSONL QA file (``images``, ``text`` with ``<image>``, ``answer``). DataError names the file
    and line of a malformed record, and of one this model's processor or vocabulary cannot take (a file made for
    another model)."""
    from .data import DataError, image_marker, jsonl_records, open_images

    marker = image_marker(processor, model_type)
    out = []
    for lineno, rec in jsonl_records(path, require_answer=True):
        if limit is not None and len(out) >= limit:
            break
        where = f"{path}, line {lineno}"
        rec = dict(rec, images=open_images(rec["images"], where))
        try:
            out.append(_example(processor, marker, rec, pad_to, pad_id))
        except ValueError as e:
            raise DataError(f"{where}: this model's processor cannot take the record ({e}); is the file made for "
                            "another model?") from e
    return out


@dataclass
class EvalResult:
    threshold: float | None
    accuracy: float
    attention_flop_reduction: float
    prefill_flop_reduction: float
    categories: dict = field(default_factory=dict)
    by_task: dict = field(default_factory=dict)


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
