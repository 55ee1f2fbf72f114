"""The four attention categories, and the rule that gives each (layer, head) one (docs/DESIGN.md §2, §3).

A category says which image-image (query, key) pairs a head keeps; pairs with a text query or a text key are
always kept. Calibration measures, per head, the *recall* each sparse category would keep; the decision takes
a quantile of it over prompts and picks the cheapest category whose recall reaches its threshold, else DENSE.
This module holds the categories, that rule and the parsing of its settings (thresholds, for all layers or per
layer, quantile, forced-dense layers, a per-layer head mix); :mod:`blindsight.calibrate` measures,
:mod:`blindsight.profile` stores, :mod:`blindsight.tune` searches the thresholds.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from enum import IntEnum

import torch

from .values import as_integer, is_number, show

__all__ = ["Category", "SPARSE_CATEGORIES", "DECISION_ORDER", "DEFAULT_THRESHOLD", "normalize_thresholds",
           "layer_thresholds", "thresholds_setting", "check_quantile", "check_dense_layers", "aggregate_recall",
           "decide_categories", "parse_mix"]


class Category(IntEnum):
    """What an attention head keeps of image-image pairs; text queries and text keys are always kept.

    DENSE: everything. INTRA_SINK: same image, or the key is a sink. INTRA: same image.
    SINK: the key is a sink, or the key is the query itself.
    """

    DENSE = 0
    INTRA_SINK = 1
    INTRA = 2
    SINK = 3

    @property
    def json_name(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: Category | str | int) -> Category:
        """A Category, its name (any case) or its number 0-3. Bools and fractional numbers are refused, not
        rounded: ``int(2.7)`` and ``True == 1`` would silently pick a category."""
        if isinstance(value, Category):
            return value
        if isinstance(value, str) and value.strip().upper() in cls.__members__:
            return cls[value.strip().upper()]
        number = None if isinstance(value, str) else as_integer(value)
        if number is not None and 0 <= number < len(cls):
            return cls(number)
        raise ValueError(f"unknown category {show(value)}; expected one of {[c.json_name for c in cls]} (or 0-3)")


SPARSE_CATEGORIES = (Category.INTRA_SINK, Category.INTRA, Category.SINK)  # order of the stored statistics
DECISION_ORDER = (Category.SINK, Category.INTRA, Category.INTRA_SINK)  # cheapest first
DEFAULT_THRESHOLD = 0.95


def normalize_thresholds(thresholds) -> dict[Category, float]:
    """One number for all sparse categories, or a mapping ``{category or name: number}`` (others: 0.95); each
    in [0, 1]. ValueError names what is wrong."""
    if thresholds is None:
        thresholds = DEFAULT_THRESHOLD
    if is_number(thresholds):
        given = {c: thresholds for c in SPARSE_CATEGORIES}
    elif isinstance(thresholds, Mapping):
        given = {}
        for key, value in thresholds.items():
            try:
                c = Category.parse(key)
            except ValueError as e:
                raise ValueError(f"thresholds: {e}") from None
            if c == Category.DENSE:
                raise ValueError("thresholds: dense has no threshold (it is the fallback)")
            if c in given:
                raise ValueError(f"thresholds: {c.json_name} is given twice ({show(key)})")
            if not is_number(value):
                raise ValueError(f"threshold of {c.json_name} must be a number, got {show(value)}")
            given[c] = value
    else:
        raise ValueError(f"thresholds must be a number in [0, 1] or a mapping {{category: number}}, got "
                         f"{show(thresholds)}")
    out = {c: DEFAULT_THRESHOLD for c in SPARSE_CATEGORIES}
    for c, v in given.items():
        if not 0.0 <= v <= 1.0:  # NaN fails too; compared before float(), which a huge int would overflow
            raise ValueError(f"threshold of {c.json_name} must be in [0, 1], got {show(v)}")
        out[c] = float(v)
    return out


def layer_thresholds(thresholds, num_layers: int, keep: Sequence[Mapping] | None = None) -> list[dict[Category, float]]:
    """The thresholds of each layer: one setting for all layers (a number or mapping, as
    :func:`normalize_thresholds`), or a list of ``num_layers`` such settings, one per layer. In that list None
    is ``keep[layer]`` (a layer's current thresholds, as this function returns them), or the default when
    ``keep`` is None. ValueError names what is wrong."""
    if isinstance(thresholds, (list, tuple)):
        if len(thresholds) != num_layers:
            raise ValueError(f"per-layer thresholds must have one entry per layer ({num_layers}), got "
                             f"{len(thresholds)}")
        out = []
        for layer, t in enumerate(thresholds):
            if isinstance(t, (list, tuple)):
                raise ValueError(f"thresholds[{layer}] must be a number or a mapping {{category: number}}, got "
                                 f"{show(t)}")
            if t is None and keep is not None:
                t = keep[layer]
            try:
                out.append(normalize_thresholds(t))
            except ValueError as e:
                raise ValueError(f"thresholds[{layer}]: {e}") from None
        return out
    return [normalize_thresholds(thresholds)] * num_layers


def thresholds_setting(per_layer: Sequence[Mapping[Category, float]]) -> dict | list[dict]:
    """What a profile stores for per-layer thresholds: one mapping ``{name: number}`` when every layer has the
    same, else a list of one mapping per layer."""
    named = [{c.json_name: float(t[c]) for c in SPARSE_CATEGORIES} for t in per_layer]
    return named[0] if all(t == named[0] for t in named) else named


def check_quantile(quantile) -> float:
    """The quantile over prompts as a float in [0, 1]; ValueError otherwise."""
    if not is_number(quantile):
        raise ValueError(f"quantile must be a number in [0, 1], got {show(quantile)}")
    if not 0.0 <= quantile <= 1.0:  # NaN fails too
        raise ValueError(f"quantile must be in [0, 1], got {show(quantile)}")
    return float(quantile)


def check_dense_layers(dense_layers, num_layers: int) -> tuple[int, ...]:
    """The layers forced DENSE as ints in [0, num_layers). A fractional or bool entry is refused: ``0.5`` would
    match no layer and ``True`` would be layer 1."""
    if isinstance(dense_layers, (str, bytes, Mapping)) or not isinstance(dense_layers, Iterable):
        raise ValueError(f"dense_layers must be a list of layer numbers, got {show(dense_layers)}")
    out = []
    for layer in dense_layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise ValueError(f"dense_layers must be layer numbers (ints), got {show(layer)}")
        if not 0 <= layer < num_layers:
            raise ValueError(f"dense_layers: layer {show(layer)} is out of range for {num_layers} layers "
                             f"(0 to {num_layers - 1})")
        out.append(int(layer))
    return tuple(out)


def aggregate_recall(recalls: torch.Tensor, quantile: float) -> torch.Tensor:
    """``recalls [prompts, L, H, 3]`` -> ``[L, H, 3]``: the quantile over prompts (0 = minimum)."""
    quantile = check_quantile(quantile)
    if recalls.shape[0] == 0:
        return torch.full(recalls.shape[1:], float("nan"), dtype=torch.float64)
    return torch.quantile(recalls.double(), quantile, dim=0)


def decide_categories(agg: torch.Tensor, thresholds, dense_layers: Sequence[int] = ()) -> list[list[Category]]:
    """Cheapest category whose aggregated recall ``agg [L, H, 3]`` reaches its threshold, else DENSE.
    ``thresholds``: one setting for all layers or a list of one per layer (:func:`layer_thresholds`)."""
    num_layers, num_heads, _ = agg.shape
    per_layer = layer_thresholds(thresholds, num_layers)
    dense_layers = check_dense_layers(dense_layers, num_layers)
    out = []
    for layer in range(num_layers):
        row = []
        for head in range(num_heads):
            choice = Category.DENSE
            if layer not in dense_layers:
                for c in DECISION_ORDER:
                    r = agg[layer, head, SPARSE_CATEGORIES.index(c)]
                    if not torch.isnan(r) and r >= per_layer[layer][c]:
                        choice = c
                        break
            row.append(choice)
        out.append(row)
    return out


def parse_mix(mix: str, num_heads: int) -> list[Category]:
    """``"dense:3,intra:9"`` -> per-head categories (counts must add up to ``num_heads``)."""
    parts = []
    for item in mix.split(","):
        name, _, n = item.partition(":")
        # isdecimal, not isdigit: int() refuses '²'; a count of more digits than heads exist is too many anyway
        if n and not (n.strip().isdecimal() and len(n.strip()) <= 18 and int(n) > 0):
            raise ValueError(f"mix {show(mix)}: {show(item)} must be name:count with a positive count")
        parts.append((Category.parse(name), int(n or 1)))
    total = sum(n for _, n in parts)  # counted before the list is built: "dense:10000000000" would not fit
    if total != num_heads:
        raise ValueError(f"mix {show(mix)} gives {total} heads, the model has {num_heads}")
    return [c for c, n in parts for _ in range(n)]
