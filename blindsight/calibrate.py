"""Calibration: run the dense model on multi-image prompts and give every (layer, head) a category (DESIGN §3).

For each language-model layer l and query head h, over the image query rows of a prompt, with p the dense
attention probabilities (the model's own mask, scale and GQA), the recall a sparse category c keeps is
``1 - (attention mass c removes) / (number of image query rows)``. Per prompt and category these recalls
are mergeable sufficient statistics: shards of prompts computed by several processes concatenate exactly.
The decision takes a low quantile over prompts (default: the minimum) and picks the cheapest category
(SINK, then INTRA, then INTRA_SINK) whose aggregate reaches its threshold; otherwise DENSE.

The language model's attention modules are found by the compiler pass's rule (``language_model_layer``);
the model runs eagerly and each of their SDPA calls also yields the removed masses, query chunk by query
chunk (memory O(H * chunk * S); no S x S map for all heads is ever held).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Iterable, Sequence

import torch

from .categories import SPARSE_CATEGORIES, Category, check_dense_layers, check_quantile, layer_thresholds
from .hf import UnsupportedAttentionError, language_model_layer, not_sdpa_message
from .layout import Layout
from .profile import ModelInfo, Profile
from .progress import progress_bar
from .template import Template

__all__ = ["calibrate", "removed_mass"]

_CHUNK_ELEMENTS = 1 << 24  # scores held at once: H * chunk * S floats


def removed_mass(q, k, attn_mask, is_causal: bool, scale, image: torch.Tensor, sink: torch.Tensor):
    """Attention mass each sparse category removes, summed over image query rows.

    ``q`` ``[B, H, S, D]``, ``k`` ``[B, Hk, S, D]`` (GQA when Hk < H), ``attn_mask`` bool or additive
    ``[B|1, H|1, S, S]`` or None. Returns ``(removed [B, 3, H] float64 in SPARSE_CATEGORIES order,
    image_rows [B])``.
    """
    B, H, S, D = q.shape
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
    scale = 1 / math.sqrt(D) if scale is None else scale
    removed = torch.zeros(B, len(SPARSE_CATEGORIES), H, dtype=torch.float64)
    rows = torch.zeros(B, dtype=torch.long)
    keys = torch.arange(S, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // (H * S))
    for b in range(B):
        img = image[b].to(q.device).long()
        snk = sink[b].to(q.device)
        n_img = int(img.max()) + 1
        idx_all = (img >= 0).nonzero().flatten()
        rows[b] = idx_all.numel()
        if n_img == 0:
            continue
        # key membership, one column per image: all its tokens, and its sinks only
        member = torch.nn.functional.one_hot(img.clamp_min(0), n_img).float() * (img >= 0)[:, None]
        member = torch.cat([member, member * snk[:, None]], dim=1)  # [S, 2 * n_img]
        for start in range(0, idx_all.numel(), chunk):
            idx = idx_all[start:start + chunk]
            scores = torch.einsum("hqd,hkd->hqk", q[b][:, idx].float(), k[b].float()) * scale
            if attn_mask is not None:
                m = attn_mask[b if attn_mask.shape[0] > 1 else 0][:, idx]
                scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
            if is_causal:
                scores = scores.masked_fill(keys[None, None, :] > idx[None, :, None], float("-inf"))
            p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            mass = (p @ member).double()  # [H, c, 2 * n_img]: mass on each image, and on its sinks
            on_image, on_sink = mass[..., :n_img], mass[..., n_img:]
            own = img[idx][None, :, None].expand(H, -1, 1)
            other = on_image.sum(-1) - on_image.gather(-1, own)[..., 0]  # mass on other images
            other_sinks = on_sink.sum(-1) - on_sink.gather(-1, own)[..., 0]
            # SINK keeps sinks and the query itself: it removes image non-sink keys other than q
            self_mass = p.gather(-1, idx[None, :, None].expand(H, -1, 1))[..., 0].double() * (~snk[idx])[None]
            non_sink_image = on_image.sum(-1) - on_sink.sum(-1) - self_mass
            per_cat = {
                Category.INTRA_SINK: other - other_sinks,
                Category.INTRA: other,
                Category.SINK: non_sink_image,
            }
            for i, c in enumerate(SPARSE_CATEGORIES):
                removed[b, i] += per_cat[c].sum(-1).cpu()
    return removed, rows


class _Interceptor:
    """Measures the language model's SDPA calls during a dense eager forward.

    Forward hooks on the decoder layers' attention modules (found by the compiler pass's rule,
    ``language_model_layer``) tell which layer runs; ``scaled_dot_product_attention`` is wrapped for the
    duration of calibration so each full-prompt call of such a layer also adds its removed masses.
    Nothing of the model changes; the wrapper computes the very same SDPA output.
    """

    def __init__(self, model, num_layers: int, num_heads: int):
        self.model, self.shape = model, (num_layers, num_heads)
        self.modules = {name: layer for name, _ in model.named_modules()
                        if (layer := language_model_layer(name)) is not None}
        if not self.modules:
            raise ValueError("calibration found no language-model attention modules (...layers.<i>.self_attn)")
        self.current: int | None = None
        self.layouts: tuple[Layout, ...] = ()

    def start(self, *layouts: Layout):
        """Measure the next forward under each of ``layouts`` (the same prompt, segmented differently)."""
        self.layouts = layouts
        self.removed = [torch.zeros(layouts[0].batch_size, *self.shape, len(SPARSE_CATEGORIES), dtype=torch.float64)
                        for _ in layouts]
        self.measured, self.ran = set(), set()

    def sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        out = _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)
        layer = self.current
        if layer is not None and self.layouts and q.shape[2] == k.shape[2] == self.layouts[0].seq_len:
            for layout, removed in zip(self.layouts, self.removed):
                r, _ = removed_mass(q, k, attn_mask, is_causal, scale, layout.image, layout.sink)
                removed[:, layer] += r.transpose(1, 2)
            self.measured.add(layer)
        return out

    @contextlib.contextmanager
    def active(self):
        handles = []
        for name, module in self.model.named_modules():
            if name in self.modules:
                layer = self.modules[name]
                handles.append(module.register_forward_pre_hook(lambda m, a, layer=layer: self._enter(layer)))
                handles.append(module.register_forward_hook(lambda m, a, o: self._exit()))
        torch.nn.functional.scaled_dot_product_attention = self.sdpa
        try:
            yield self
        finally:
            torch.nn.functional.scaled_dot_product_attention = _SDPA
            for h in handles:
                h.remove()

    def _enter(self, layer):
        self.current = layer
        self.ran.add(layer)

    def _exit(self):
        self.current = None


_SDPA = torch.nn.functional.scaled_dot_product_attention


def _template_for(model, template):
    if template is not None:
        return template
    return Template.from_config(model.config)


def calibrate(
    model,
    samples: Iterable[dict],
    *,
    template: Template | None = None,
    thresholds=None,
    quantile: float = 0.0,
    dense_layers: Sequence[int] = (),
    progress: bool = True,
    source: str = "samples",
) -> Profile:
    """Calibrate ``model`` (a transformers VLM loaded with ``attn_implementation="sdpa"``) on ``samples``.

    ``samples``: model-input dicts as a processor returns them (``input_ids``, ``attention_mask``,
    ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``/``token_type_ids``, ...); each batch row is one
    prompt. Under ``torch.distributed`` each rank takes every world-size-th sample and the statistics are
    gathered, so every rank returns the profile one process would compute.
    """
    template = _template_for(model, template)
    # the profile carries the template it was measured with (the families whose config does not name it too)
    info = dataclasses.replace(ModelInfo.from_config(model), template=template.to_dict())
    # fail before the long run, not when deciding after it
    layer_thresholds(thresholds, info.num_layers)
    check_quantile(quantile)
    check_dense_layers(dense_layers, info.num_layers)
    rank, world = _dist_rank_world()
    spy = _Interceptor(model, info.num_layers, info.num_heads)
    records = []
    mine = [(i, s) for i, s in enumerate(samples) if i % world == rank]
    # only attention is measured: skip the LM head's logits over the whole prompt when the model allows it
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with spy.active(), torch.no_grad():
        for i, sample in progress_bar(mine, progress and rank == 0, "calibrating", unit="prompt"):
            sample = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
            layout = Layout.from_input_ids(sample["input_ids"], template, sample.get("attention_mask"),
                                           sample.get("video_grid_thw"))
            other = _other_video_layout(sample, template)
            spy.start(*[x.to(model.device) for x in (layout, other) if x is not None])
            model(**sample, **extra)
            if spy.ran and not spy.measured:
                raise UnsupportedAttentionError(not_sdpa_message(next(iter(spy.modules))))
            missing = set(range(info.num_layers)) - spy.measured
            if missing:
                raise RuntimeError(f"calibration measured no full-prompt attention call of layers {sorted(missing)}")
            image_rows = (layout.image >= 0).sum(dim=1)
            for b in range(layout.batch_size):
                if image_rows[b] == 0:
                    continue  # a prompt without images says nothing about cross-image attention
                recall = 1 - spy.removed[0][b] / image_rows[b]
                record = {"sample": i, "row": b, "image_rows": int(image_rows[b]), "recall": recall.tolist()}
                if other is not None:  # what the other choice of video segments would keep
                    other_recall = 1 - spy.removed[1][b] / (other.image[b] >= 0).sum().clamp_min(1)
                    record["video_segments"] = {_other_choice(template): other_recall.tolist()}
                records.append(record)
    records = _gather(records, world)
    if not records:
        raise ValueError("calibration needs at least one sample with an image")
    scores = {"statistic": "recall", "categories": [c.json_name for c in SPARSE_CATEGORIES], "prompts": records}
    calibration = {"samples": len(records), "source": source}
    videos = _video_segments_report(records, template)
    if videos:
        calibration["video_segments"] = videos
    profile = Profile(info, tuple(tuple([Category.DENSE] * info.num_heads) for _ in range(info.num_layers)),
                      calibration, scores)
    return profile.decide(thresholds=thresholds, quantile=quantile, dense_layers=dense_layers)


def _other_choice(template: Template) -> str:
    return "frame" if template.video_segments == "video" else "video"


def _other_video_layout(sample: dict, template: Template) -> Layout | None:
    """The prompt's layout under the other ``video_segments`` choice, if the prompt has a video it would change."""
    if not template.nests_videos or not bool(torch.isin(sample["input_ids"].cpu(),
                                                         torch.tensor(template.video_token_ids)).any()):
        return None
    other = dataclasses.replace(template, video_segments=_other_choice(template))
    try:
        return Layout.from_input_ids(sample["input_ids"], other, sample.get("attention_mask"),
                                     sample.get("video_grid_thw"))
    except ValueError:  # e.g. per-frame segments without the prompt's video_grid_thw: nothing to compare
        return None


def _video_segments_report(records: list, template: Template) -> dict:
    """Mean recall per sparse category over the video prompts, for a video as one segment and per frame."""
    mine = [r for r in records if "video_segments" in r]
    if not mine:
        return {}
    other = _other_choice(template)

    def mean(recalls):
        t = torch.tensor(recalls, dtype=torch.float64)  # [P, L, H, 3]
        return {c.json_name: round(float(t[..., i].mean()), 6) for i, c in enumerate(SPARSE_CATEGORIES)}

    return {"prompts": len(mine), template.video_segments: mean([r["recall"] for r in mine]),
            other: mean([r["video_segments"][other] for r in mine])}


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(records: list, world: int) -> list:
    if world > 1:
        import torch.distributed as dist

        parts = [None] * world
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: (r["sample"], r["row"]))
