"""Per-(layer, head) attention categories and the versioned profile file (DESIGN.md §2, §4)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any, Sequence

from .layout import Template

__all__ = [
    "Category",
    "ModelInfo",
    "Profile",
    "ProfileFormatError",
    "ProfileMismatchError",
    "PROFILE_FORMAT",
    "PROFILE_VERSION",
]

PROFILE_FORMAT = "blindsight-profile"
PROFILE_VERSION = 1


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
    def parse(cls, value: "Category | str | int") -> "Category":
        if isinstance(value, Category):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                raise ValueError(
                    f"unknown category {value!r}; expected one of {[c.json_name for c in cls]}"
                ) from None
        return cls(int(value))


class ProfileFormatError(ValueError):
    """The profile file is not a readable BlindSight profile of a supported version."""


class ProfileMismatchError(ValueError):
    """The profile was made for a model of another shape."""


@dataclass(frozen=True)
class ModelInfo:
    """The language-model shape a profile belongs to."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    template: dict | None = None

    def __post_init__(self):
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelInfo.{name} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelInfo: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @classmethod
    def from_config(cls, config) -> "ModelInfo":
        """From a transformers config (VLM or text-only) or a model (its ``.config``)."""
        if isinstance(config, ModelInfo):
            return config
        config = getattr(config, "config", config)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        try:
            template = Template.from_config(config).to_dict()
        except ValueError:
            template = None
        return cls(
            model_type=config.model_type,
            num_layers=text.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            template=template,
        )

    def differences(self, other: "ModelInfo") -> list[str]:
        return [
            f"{k}: profile has {getattr(self, k)!r}, model has {getattr(other, k)!r}"
            for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim")
            if getattr(self, k) != getattr(other, k)
        ]


@dataclass(frozen=True)
class Profile:
    """Categories per layer and query head, with the calibration scores and settings that produced them.

    ``scores`` holds the mergeable per-prompt statistics of calibration (its layout is owned by
    ``blindsight.calibrate``); hand-made profiles have none.
    """

    model: ModelInfo
    categories: tuple[tuple[Category, ...], ...]
    calibration: dict = field(default_factory=dict)
    scores: Any = None

    def __post_init__(self):
        cats = tuple(tuple(Category.parse(c) for c in layer) for layer in self.categories)
        object.__setattr__(self, "categories", cats)
        if len(cats) != self.model.num_layers:
            raise ProfileMismatchError(
                f"profile has categories for {len(cats)} layers but its model has {self.model.num_layers}"
            )
        for i, layer in enumerate(cats):
            if len(layer) != self.model.num_heads:
                raise ProfileMismatchError(
                    f"profile layer {i} has {len(layer)} heads but its model has {self.model.num_heads} query heads"
                )

    @classmethod
    def from_categories(cls, categories: Sequence[Sequence[Category | str]], model_or_config) -> "Profile":
        """A hand-made profile: ``categories[layer][query_head]``, names or :class:`Category`."""
        info = ModelInfo.from_config(model_or_config)
        return cls(info, tuple(tuple(layer) for layer in categories), {"source": "hand-made"})

    @classmethod
    def uniform(cls, category: Category | str, model_or_config) -> "Profile":
        info = ModelInfo.from_config(model_or_config)
        return cls.from_categories([[category] * info.num_heads] * info.num_layers, info)

    # ---- checks -------------------------------------------------------------------------------
    def check_model(self, model_or_config) -> None:
        """Raise :class:`ProfileMismatchError` if the profile does not fit this model."""
        other = ModelInfo.from_config(model_or_config)
        diffs = self.model.differences(other)
        if diffs:
            raise ProfileMismatchError(
                f"profile for {self.model.model_type!r} does not fit this {other.model_type!r} model: "
                + "; ".join(diffs)
                + ". Calibrate this model (blindsight calibrate) or load its own profile."
            )

    # ---- queries --------------------------------------------------------------------------------
    def layer_categories(self, layer: int) -> tuple[Category, ...]:
        return self.categories[layer]

    def counts(self) -> dict[Category, int]:
        out = {c: 0 for c in Category}
        for layer in self.categories:
            for c in layer:
                out[c] += 1
        return out

    def summary(self) -> str:
        total = self.model.num_layers * self.model.num_heads
        counts = self.counts()
        lines = [
            f"BlindSight profile: {self.model.model_type}, {self.model.num_layers} layers x "
            f"{self.model.num_heads} heads ({self.model.num_kv_heads} kv), head_dim {self.model.head_dim}",
            "  " + ", ".join(f"{c.json_name} {counts[c]} ({100 * counts[c] / total:.0f}%)" for c in Category),
        ]
        letters = {Category.DENSE: "D", Category.INTRA_SINK: "X", Category.INTRA: "I", Category.SINK: "S"}
        for i, layer in enumerate(self.categories):
            lines.append(f"  layer {i:3d}: " + "".join(letters[c] for c in layer))
        lines.append("  (D dense, X intra_sink, I intra, S sink)")
        return "\n".join(lines)

    # ---- calibration statistics ------------------------------------------------------------------
    def _recalls(self):
        import torch

        if not self.scores or not self.scores.get("prompts"):
            raise ValueError("this profile has no calibration statistics (hand-made?): calibrate the model first")
        return torch.tensor([p["recall"] for p in self.scores["prompts"]], dtype=torch.float64)  # [P, L, H, 3]

    def recall(self, category: Category | str, quantile: float | None = None):
        """Aggregated recall ``[layers, heads]`` of a sparse category (quantile over prompts; default: the
        profile's own)."""
        from .calibrate import SPARSE_CATEGORIES, aggregate_recall

        c = Category.parse(category)
        if c not in SPARSE_CATEGORIES:
            raise ValueError(f"recall is measured for {[x.json_name for x in SPARSE_CATEGORIES]}, not {c.json_name}")
        q = self.calibration.get("quantile", 0.0) if quantile is None else quantile
        return aggregate_recall(self._recalls(), q)[..., SPARSE_CATEGORIES.index(c)]

    def decide(self, thresholds=None, quantile: float | None = None, dense_layers=None) -> "Profile":
        """A new profile decided from the stored per-prompt statistics (no model run). Unset arguments keep
        this profile's settings."""
        from .calibrate import aggregate_recall, decide_categories, normalize_thresholds

        cal = dict(self.calibration)
        if thresholds is None:
            thresholds = cal.get("thresholds")
        quantile = cal.get("quantile", 0.0) if quantile is None else float(quantile)
        dense_layers = tuple(cal.get("dense_layers", ())) if dense_layers is None else tuple(dense_layers)
        th = normalize_thresholds(thresholds)
        cats = decide_categories(aggregate_recall(self._recalls(), quantile), th, dense_layers)
        cal.update(thresholds={c.json_name: v for c, v in th.items()}, quantile=quantile,
                   dense_layers=list(dense_layers))
        return Profile(self.model, tuple(tuple(layer) for layer in cats), cal, self.scores)

    # ---- file format ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        from . import __version__

        calibration = dict(self.calibration)
        calibration.setdefault("tool_version", __version__)
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "model": asdict(self.model),
            "calibration": calibration,
            "scores": self.scores,
            "categories": [[c.json_name for c in layer] for layer in self.categories],
        }

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def from_dict(cls, d: Any, source: str = "profile") -> "Profile":
        if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT:
            raise ProfileFormatError(f"{source}: not a BlindSight profile (expected \"format\": \"{PROFILE_FORMAT}\")")
        version = d.get("version")
        if version != PROFILE_VERSION:
            newer = isinstance(version, int) and version > PROFILE_VERSION
            raise ProfileFormatError(
                f"{source}: profile format version {version!r} is not supported (this BlindSight reads version "
                f"{PROFILE_VERSION})" + ("; upgrade blindsight to read it." if newer else ".")
            )
        try:
            model = ModelInfo(**d["model"])
            return cls(model, tuple(tuple(layer) for layer in d["categories"]), dict(d.get("calibration") or {}), d.get("scores"))
        except ProfileMismatchError as e:
            raise ProfileFormatError(f"{source}: inconsistent profile: {e}") from e
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileFormatError(f"{source}: malformed profile: {type(e).__name__}: {e}") from e

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ProfileFormatError(f"{path}: corrupt profile, not valid JSON ({e})") from e
        except UnicodeDecodeError as e:
            raise ProfileFormatError(f"{path}: corrupt profile, not text ({e})") from e
        return cls.from_dict(d, source=str(path))
