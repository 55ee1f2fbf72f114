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
import inspect
import math
import numbers
from typing import Iterable, Mapping, Sequence

import torch
import torch.fx

from .fx.sites import UnsupportedAttentionError, language_model_layer, not_sdpa_message
from .layout import Layout, Template
from .profile import Category, ModelInfo, Profile

__all__ = ["calibrate", "removed_mass", "decide_categories", "normalize_thresholds", "check_quantile",
           "check_dense_layers", "check_scores", "SPARSE_CATEGORIES"]

SPARSE_CATEGORIES = (Category.INTRA_SINK, Category.INTRA, Category.SINK)  # order of the stored statistics
DECISION_ORDER = (Category.SINK, Category.INTRA, Category.INTRA_SINK)  # cheapest first
DEFAULT_THRESHOLD = 0.95
_CHUNK_ELEMENTS = 1 << 24  # scores held at once: H * chunk * S floats
# a stored recall is 1 - (float32 sums of probabilities) / rows: it may leave [0, 1] by rounding, not by more
RECALL_SLACK = 1e-3


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
        self.layout: Layout | None = None

    def start(self, layout: Layout):
        self.layout = layout
        self.removed = torch.zeros(layout.batch_size, *self.shape, len(SPARSE_CATEGORIES), dtype=torch.float64)
        self.measured, self.ran = set(), set()

    def sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        out = _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)
        layer = self.current
        if layer is not None and self.layout is not None and q.shape[2] == k.shape[2] == self.layout.seq_len:
            removed, _ = removed_mass(q, k, attn_mask, is_causal, scale, self.layout.image, self.layout.sink)
            self.removed[:, layer] += removed.transpose(1, 2)
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


def _is_number(v) -> bool:
    """A real number, not a bool (``True`` would be taken as 1.0)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def normalize_thresholds(thresholds) -> dict[Category, float]:
    """One number for all sparse categories, or a mapping ``{category or name: number}`` (others: 0.95); each
    in [0, 1]. ValueError names what is wrong."""
    if thresholds is None:
        thresholds = DEFAULT_THRESHOLD
    if _is_number(thresholds):
        out = {c: float(thresholds) for c in SPARSE_CATEGORIES}
    elif isinstance(thresholds, Mapping):
        out = {c: DEFAULT_THRESHOLD for c in SPARSE_CATEGORIES}
        for key, value in thresholds.items():
            try:
                c = Category.parse(key)
            except ValueError as e:
                raise ValueError(f"thresholds: {e}") from None
            if c == Category.DENSE:
                raise ValueError("thresholds: dense has no threshold (it is the fallback)")
            if not _is_number(value):
                raise ValueError(f"threshold of {c.json_name} must be a number, got {value!r}")
            out[c] = float(value)
    else:
        raise ValueError(f"thresholds must be a number in [0, 1] or a mapping {{category: number}}, got {thresholds!r}")
    for c, v in out.items():
        if not 0.0 <= v <= 1.0:  # NaN fails too
            raise ValueError(f"threshold of {c.json_name} must be in [0, 1], got {v}")
    return out


def check_quantile(quantile) -> float:
    """The quantile over prompts as a float in [0, 1]; ValueError otherwise."""
    if not _is_number(quantile):
        raise ValueError(f"quantile must be a number in [0, 1], got {quantile!r}")
    if not 0.0 <= quantile <= 1.0:  # NaN fails too
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    return float(quantile)


def check_dense_layers(dense_layers, num_layers: int) -> tuple[int, ...]:
    """The layers forced DENSE as ints in [0, num_layers). A fractional or bool entry is refused: ``0.5`` would
    match no layer and ``True`` would be layer 1."""
    if isinstance(dense_layers, (str, bytes, Mapping)) or not isinstance(dense_layers, Iterable):
        raise ValueError(f"dense_layers must be a list of layer numbers, got {dense_layers!r}")
    out = []
    for layer in dense_layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise ValueError(f"dense_layers must be layer numbers (ints), got {layer!r}")
        if not 0 <= layer < num_layers:
            raise ValueError(f"dense_layers: layer {layer} is out of range for {num_layers} layers "
                             f"(0 to {num_layers - 1})")
        out.append(int(layer))
    return tuple(out)


def check_scores(scores, num_layers: int, num_heads: int) -> None:
    """ValueError naming the field unless ``scores`` is what :func:`calibrate` stores: ``statistic`` "recall",
    ``categories`` in SPARSE_CATEGORIES order (the order of each recall triple: another order would silently
    swap categories), and ``prompts[i].recall`` of shape ``[num_layers][num_heads][3]`` with values in [0, 1]."""
    if not isinstance(scores, Mapping):
        raise ValueError(f"scores must be an object, got {type(scores).__name__}")
    if scores.get("statistic") != "recall":
        raise ValueError(f'scores.statistic must be "recall", got {scores.get("statistic")!r}')
    expected = [c.json_name for c in SPARSE_CATEGORIES]
    if scores.get("categories") != expected:
        raise ValueError(f"scores.categories must be {expected} (the order of each stored recall triple), "
                         f"got {scores.get('categories')!r}")
    prompts = scores.get("prompts")
    if not isinstance(prompts, list):
        raise ValueError(f"scores.prompts must be a list, got {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, Mapping):
            raise ValueError(f"scores.prompts[{i}] must be an object, got {type(prompt).__name__}")
        if "recall" not in prompt:
            raise ValueError(f"scores.prompts[{i}].recall is missing")
        _check_recall(prompt["recall"], f"scores.prompts[{i}].recall", num_layers, num_heads)


def _check_list(value, length: int, where: str, what: str) -> None:
    if not isinstance(value, list) or len(value) != length:
        got = f"{len(value)} entries" if isinstance(value, list) else type(value).__name__
        raise ValueError(f"{where} must be a list of {length} {what}, got {got}")


def _check_recall(recall, where: str, num_layers: int, num_heads: int) -> None:
    """``recall[layer][head][category]``, by loops rather than a tensor so the message names the entry."""
    names = [c.json_name for c in SPARSE_CATEGORIES]
    _check_list(recall, num_layers, where, "layers")
    for l, layer in enumerate(recall):
        _check_list(layer, num_heads, f"{where}[{l}]", "heads")
        for h, head in enumerate(layer):
            _check_list(head, len(names), f"{where}[{l}][{h}]", f"recalls {names}")
            for c, v in enumerate(head):
                if not _is_number(v) or not -RECALL_SLACK <= v <= 1 + RECALL_SLACK:  # NaN fails too
                    raise ValueError(f"{where}[{l}][{h}][{c}] must be a recall in [0, 1], got {v!r}")


def aggregate_recall(recalls: torch.Tensor, quantile: float) -> torch.Tensor:
    """``recalls [prompts, L, H, 3]`` -> ``[L, H, 3]``: the quantile over prompts (0 = minimum)."""
    quantile = check_quantile(quantile)
    if recalls.shape[0] == 0:
        return torch.full(recalls.shape[1:], float("nan"), dtype=torch.float64)
    return torch.quantile(recalls.double(), quantile, dim=0)


def decide_categories(agg: torch.Tensor, thresholds, dense_layers: Sequence[int] = ()) -> list[list[Category]]:
    """Cheapest category whose aggregated recall ``agg [L, H, 3]`` reaches its threshold, else DENSE."""
    th = normalize_thresholds(thresholds)
    L, H, _ = agg.shape
    dense_layers = check_dense_layers(dense_layers, L)
    out = []
    for l in range(L):
        layer = []
        for h in range(H):
            choice = Category.DENSE
            if l not in dense_layers:
                for c in DECISION_ORDER:
                    r = agg[l, h, SPARSE_CATEGORIES.index(c)]
                    if not torch.isnan(r) and r >= th[c]:
                        choice = c
                        break
            layer.append(choice)
        out.append(layer)
    return out


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
    info = ModelInfo.from_config(model)
    template = _template_for(model, template)
    # fail before the long run, not when deciding after it
    normalize_thresholds(thresholds)
    check_quantile(quantile)
    check_dense_layers(dense_layers, info.num_layers)
    rank, world = _dist_rank_world()
    spy = _Interceptor(model, info.num_layers, info.num_heads)
    records = []
    mine = [(i, s) for i, s in enumerate(samples) if i % world == rank]
    # only attention is measured: skip the LM head's logits over the whole prompt when the model allows it
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with spy.active(), torch.no_grad():
        for i, sample in _progress(mine, progress and rank == 0, "calibrating"):
            sample = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
            layout = Layout.from_input_ids(sample["input_ids"], template, sample.get("attention_mask"))
            spy.start(layout.to(model.device))
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
                recall = 1 - spy.removed[b] / image_rows[b]
                records.append({"sample": i, "row": b, "image_rows": int(image_rows[b]), "recall": recall.tolist()})
    records = _gather(records, world)
    if not records:
        raise ValueError("calibration needs at least one sample with an image")
    scores = {"statistic": "recall", "categories": [c.json_name for c in SPARSE_CATEGORIES], "prompts": records}
    calibration = {"samples": len(records), "source": source}
    profile = Profile(info, tuple(tuple([Category.DENSE] * info.num_heads) for _ in range(info.num_layers)),
                      calibration, scores)
    return profile.decide(thresholds=thresholds, quantile=quantile, dense_layers=dense_layers)


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


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="prompt")
