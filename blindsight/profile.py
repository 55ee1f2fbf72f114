"""The versioned profile file: per-(layer, head) categories with the statistics that decided them (DESIGN §4).

It also checks a profile against a model (:meth:`Profile.check_model`, :func:`check_template`): a profile made
for another shape, or a template whose image ids contradict the model's config, is refused up front.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from . import hf
from .categories import (
    SPARSE_CATEGORIES,
    Category,
    aggregate_recall,
    check_dense_layers,
    check_quantile,
    decide_categories,
    layer_thresholds,
    thresholds_setting,
)
from .template import VIDEO_SEGMENTS, Template
from .values import is_int, is_int_in, is_number, show
from .version import __version__

__all__ = [
    "ModelInfo",
    "Profile",
    "ProfileFormatError",
    "ProfileMismatchError",
    "PROFILE_FORMAT",
    "PROFILE_VERSION",
    "READABLE_VERSIONS",
    "file_version",
    "check_scores",
    "check_template",
    "check_template_dict",
    "MAX_SHAPE",
    "MAX_TOKEN_ID",
    "MAX_SINKS",
    "MAX_COUNT",
]

PROFILE_FORMAT = "blindsight-profile"
# version 2 is version 1 whose calibration.thresholds is a list of one mapping per layer (blindsight tune's per-layer
# thresholds); a profile is written as version 1 whenever its thresholds are one mapping for all layers
PROFILE_VERSION = 2
READABLE_VERSIONS = (1, 2)
# a stored recall is 1 - (float32 sums of probabilities) / rows: it may leave [0, 1] by rounding, not by more
RECALL_SLACK = 1e-3
# Bounds (DESIGN §4): what any model can have, so a number that loads cannot make a forward overflow or allocate
# without end. Layers, query heads, KV heads and head dim are in [1, MAX_SHAPE]; token ids in [0, MAX_TOKEN_ID];
# sinks_per_image in [1, MAX_SINKS]; the counts and indices of calibration records in [0, MAX_COUNT].
MAX_SHAPE = 2 ** 16
MAX_TOKEN_ID = 2 ** 31 - 1
MAX_SINKS = 2 ** 16
MAX_COUNT = 2 ** 31 - 1


class ProfileFormatError(ValueError):
    """The profile file is not a readable BlindSight profile of a supported version."""


class ProfileMismatchError(ValueError):
    """The profile was made for a model of another shape."""


_SHAPE_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "head_dim")
_TEMPLATE_IDS = ("image_open_ids", "image_close_ids", "image_token_ids")
_OPTIONAL_TEMPLATE_IDS = ("final_part_ids", "video_token_ids")  # written only by templates that use them


def _check_model_fields(m: dict, where: str) -> None:
    """ValueError naming ``where.<field>`` for a model field of the wrong type or value."""
    if not isinstance(m["model_type"], str):
        raise ValueError(f"{where}.model_type must be a string, got {show(m['model_type'])}")
    for name in _SHAPE_FIELDS:
        if not is_int(m[name]) or m[name] < 1:
            raise ValueError(f"{where}.{name} must be a positive int, got {show(m[name])}")
        if m[name] > MAX_SHAPE:
            raise ValueError(f"{where}.{name} is {show(m[name])}, more than any model has (at most {MAX_SHAPE})")
    if m["num_heads"] % m["num_kv_heads"]:
        raise ValueError(f"{where}: num_heads {m['num_heads']} is not a multiple of num_kv_heads {m['num_kv_heads']}")
    if m.get("template") is not None:
        check_template_dict(m["template"], f"{where}.template")


def check_template_dict(t, where: str = "template") -> None:
    """ValueError naming ``where.<field>`` unless ``t`` is what :meth:`Template.to_dict` writes: lists of int
    token ids in [0, MAX_TOKEN_ID], ``sinks_per_image`` in [1, MAX_SINKS] (1 when absent), and Template's own
    checks pass. Template alone would turn ``"5"`` or ``5.7`` into the id 5."""
    if not isinstance(t, dict):
        raise ValueError(f"{where} must be an object with {list(_TEMPLATE_IDS)} and sinks_per_image, got {show(t)}")
    for key in t:
        if key not in _TEMPLATE_IDS + _OPTIONAL_TEMPLATE_IDS + ("sinks_per_image", "video_segments"):
            raise ValueError(f"{where}.{key} is not a template field")
    for name in _TEMPLATE_IDS + _OPTIONAL_TEMPLATE_IDS:
        if name not in t:
            if name in _OPTIONAL_TEMPLATE_IDS:
                continue
            raise ValueError(f"{where}.{name} is missing")
        if not isinstance(t[name], (list, tuple)):
            raise ValueError(f"{where}.{name} must be a list of token ids, got {show(t[name])}")
        for i, v in enumerate(t[name]):
            if not is_int_in(v, 0, MAX_TOKEN_ID):
                raise ValueError(f"{where}.{name}[{i}] must be a token id (an int in [0, {MAX_TOKEN_ID}]), got "
                                 f"{show(v)}")
    segments = t.get("video_segments", "video")
    if not isinstance(segments, str) or segments not in VIDEO_SEGMENTS:
        raise ValueError(f"{where}.video_segments must be one of {list(VIDEO_SEGMENTS)}, got {show(segments)}")
    sinks = t.get("sinks_per_image", 1)
    if not is_int_in(sinks, 1, MAX_SINKS):
        raise ValueError(f"{where}.sinks_per_image must be an int in [1, {MAX_SINKS}], got {show(sinks)}")
    _check_template_ids(t, where)
    try:
        Template.from_dict(t)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _check_template_ids(t: dict, where: str) -> None:
    """The checks of :class:`Template` whose own messages name no field: ids used twice, and per-frame video
    segments without video ids or delimiters."""
    opens, closes = list(t["image_open_ids"]), list(t["image_close_ids"])
    toggles = {o for o in opens if o in closes}
    seen: dict[int, str] = {}
    for name, ids in (("image_open_ids", opens), ("image_close_ids", [c for c in closes if c not in toggles]),
                      ("image_token_ids", t["image_token_ids"]), ("final_part_ids", t.get("final_part_ids", ()))):
        for v in ids:
            if v in seen:
                twice = f"twice in {name}" if seen[v] == name else f"in both {seen[v]} and {name}"
                raise ValueError(f"{where}: token id {v} is {twice} (open, close, placeholder and final-part ids "
                                 "must all differ; an id may be both open i and close i)")
            seen[v] = name
    final = t.get("final_part_ids", ())
    if toggles and not final:
        raise ValueError(f"{where}: id {min(toggles)} is in both image_open_ids and image_close_ids (it opens an image "
                         "and separates its tiles), which needs final_part_ids (the ids that start an image's last "
                         "part, after which it closes)")
    if final and not toggles:
        raise ValueError(f"{where}.final_part_ids need an id that is in both image_open_ids and image_close_ids (one "
                         "that opens an image, separates its tiles, and closes it after a final part)")
    if t.get("video_segments") == "frame" and not (t.get("video_token_ids") and opens):
        raise ValueError(f'{where}.video_segments "frame" needs video_token_ids and image_open_ids (open/close '
                         "delimiters)")


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
        _check_model_fields({f.name: getattr(self, f.name) for f in fields(self)}, "ModelInfo")

    @classmethod
    def from_config(cls, config) -> ModelInfo:
        """From a transformers config (VLM or text-only) or a model (its ``.config``)."""
        if isinstance(config, ModelInfo):
            return config
        shape = hf.language_model_shape(config)
        try:
            template = Template.from_config(config).to_dict()
        except ValueError:
            template = None
        return cls(**shape, template=template)

    def differences(self, other: ModelInfo) -> list[str]:
        # two VLM families never share a profile, whatever their shapes (a language model's own config, as
        # the compiler pass sees it, does not say which VLM it belongs to: only shapes are compared then)
        families = set(hf.TEMPLATE_MODEL_TYPES) | set(hf.PROCESSOR_MODEL_TYPES)
        keys = ("num_layers", "num_heads", "num_kv_heads", "head_dim")
        if self.model_type in families and other.model_type in families:
            keys = ("model_type",) + keys
        return [
            f"{k}: profile has {getattr(self, k)!r}, model has {getattr(other, k)!r}"
            for k in keys
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
                f"profile has categories for {len(cats)} layers but its model has {self.model.num_layers} "
                "(categories, model.num_layers)"
            )
        for i, layer in enumerate(cats):
            if len(layer) != self.model.num_heads:
                raise ProfileMismatchError(
                    f"profile layer {i} has {len(layer)} heads but its model has {self.model.num_heads} query heads "
                    f"(categories[{i}], model.num_heads)"
                )

    @classmethod
    def from_categories(cls, categories: Sequence[Sequence[Category | str]], model_or_config) -> Profile:
        """A hand-made profile: ``categories[layer][query_head]``, names or :class:`Category`."""
        info = ModelInfo.from_config(model_or_config)
        return cls(info, tuple(tuple(layer) for layer in categories), {"source": "hand-made"})

    @classmethod
    def uniform(cls, category: Category | str, model_or_config) -> Profile:
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
    @property
    def template(self) -> Template | None:
        """The image template stored with the model (``model.template``), or None (a profile without one)."""
        return None if self.model.template is None else Template.from_dict(self.model.template)

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
        videos = self.calibration.get("video_segments")
        if isinstance(videos, dict) and "video" in videos and "frame" in videos:
            lines.append(f"  video prompts ({videos.get('prompts')}), mean recall: " + "; ".join(
                f"{choice}: " + ", ".join(f"{c} {v:.3f}" for c, v in videos[choice].items())
                for choice in ("video", "frame")))
        return "\n".join(lines)

    # ---- calibration statistics ------------------------------------------------------------------
    def _recalls(self):
        if not self.scores or not self.scores.get("prompts"):
            raise ValueError("this profile has no calibration statistics (hand-made?): calibrate the model first")
        return torch.tensor([p["recall"] for p in self.scores["prompts"]], dtype=torch.float64)  # [P, L, H, 3]

    def recall(self, category: Category | str, quantile: float | None = None):
        """Aggregated recall ``[layers, heads]`` of a sparse category (quantile over prompts; default: the
        profile's own)."""
        c = Category.parse(category)
        if c not in SPARSE_CATEGORIES:
            raise ValueError(f"recall is measured for {[x.json_name for x in SPARSE_CATEGORIES]}, not {c.json_name}")
        q = self.calibration.get("quantile", 0.0) if quantile is None else quantile
        return aggregate_recall(self._recalls(), q)[..., SPARSE_CATEGORIES.index(c)]

    def decide(self, thresholds=None, quantile: float | None = None, dense_layers=None) -> Profile:
        """A new profile decided from the stored per-prompt statistics (no model run). Unset arguments keep
        this profile's settings. ``thresholds``: one number, a mapping ``{category: number}``, or a list of one
        of those per layer, where None keeps that layer's current thresholds (this profile's own), so
        ``decide([0.9, None, None])`` changes layer 0 only."""
        cal = dict(self.calibration)
        own = layer_thresholds(cal.get("thresholds"), self.model.num_layers)
        th = own if thresholds is None else layer_thresholds(thresholds, self.model.num_layers, keep=own)
        quantile = check_quantile(cal.get("quantile", 0.0) if quantile is None else quantile)
        dense_layers = check_dense_layers(cal.get("dense_layers", ()) if dense_layers is None else dense_layers,
                                          self.model.num_layers)
        cats = decide_categories(aggregate_recall(self._recalls(), quantile), th, dense_layers)
        cal.update(thresholds=thresholds_setting(th), quantile=quantile, dense_layers=list(dense_layers))
        return Profile(self.model, tuple(tuple(layer) for layer in cats), cal, self.scores)

    # ---- file format ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        calibration = dict(self.calibration)
        calibration.setdefault("tool_version", __version__)
        return {
            "format": PROFILE_FORMAT,
            "version": file_version(calibration),
            "model": asdict(self.model),
            "calibration": calibration,
            "scores": self.scores,
            "categories": [[c.json_name for c in layer] for layer in self.categories],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile atomically: to a temporary file in the same directory, then ``os.replace``d onto
        ``path``, so a reader (another process loading it) sees the old file or the new one, never a part. A
        symlink is written through; an existing file keeps its permissions."""
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        path = os.fspath(path)
        target = os.path.realpath(path)
        directory, name = os.path.split(target)
        while True:
            tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
            try:  # os.open's mode (0o666, less the umask) is what open(path, "w") would give a new file
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                break
            except FileExistsError:
                continue
            except OSError as e:  # name the file asked for, not the temporary one
                raise type(e)(e.errno, e.strerror, path) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
            except FileNotFoundError:
                pass
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @classmethod
    def from_dict(cls, d: Any, source: str = "profile") -> Profile:
        """A profile from its JSON object. Every field is checked (type, range, shape): a malformed one is a
        :class:`ProfileFormatError` that names it, never a coerced value or a later IndexError."""
        if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT:
            raise ProfileFormatError(f"{source}: not a BlindSight profile (expected \"format\": \"{PROFILE_FORMAT}\")")
        version = _check_version(d.get("version"), source)
        try:
            model = ModelInfo(**_model_fields(d.get("model")))
            categories = _file_categories(d.get("categories"))
            cls(model, categories)  # the shape first: a wrong model.num_layers is named, not the recalls' length
            calibration = _calibration_settings(d.get("calibration"), model, version)
            scores = d.get("scores")
            if scores is not None:
                check_scores(scores, model.num_layers, model.num_heads)
            return cls(model, categories, calibration, scores)
        except ProfileMismatchError as e:
            raise ProfileFormatError(f"{source}: inconsistent profile: {e}") from e
        except ValueError as e:
            raise ProfileFormatError(f"{source}: malformed profile: {e}") from e
        except (KeyError, TypeError) as e:  # a check missing above: still the file's fault, still one message
            raise ProfileFormatError(f"{source}: malformed profile: {type(e).__name__}: {e}") from e

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ProfileFormatError(f"{path}: corrupt profile, not valid JSON ({e})") from e
        except UnicodeDecodeError as e:
            raise ProfileFormatError(f"{path}: corrupt profile, not text ({e})") from e
        except RecursionError:  # json's decoder recurses per nesting level
            raise ProfileFormatError(f"{path}: corrupt profile, JSON nested too deeply to read") from None
        except ValueError as e:  # e.g. an integer of more digits than Python converts
            raise ProfileFormatError(f"{path}: corrupt profile, not readable JSON ({e})") from e
        return cls.from_dict(d, source=str(path))


def check_template(template: Template, config, explicit: bool) -> None:
    """Raise :class:`ProfileMismatchError` when the template's ids contradict the model's config."""
    vocab = getattr(hf.text_config(config), "vocab_size", None)
    ids = template.image_open_ids + template.image_close_ids + template.image_token_ids
    where = "BackendOptions.template" if explicit else "the profile's template"
    if isinstance(vocab, int) and any(i >= vocab or i < 0 for i in ids):
        raise ProfileMismatchError(f"{where} uses token ids {sorted(ids)}, outside this model's vocabulary of "
                                   f"{vocab}: it was made for another model")
    try:
        own = Template.from_config(config)
    except (ValueError, AttributeError):  # the config does not name every image id: check the ones it names
        missing = set(hf.config_placeholder_ids(config)) - set(template.image_token_ids)
        if missing:
            raise ProfileMismatchError(
                f"{where} has image_token_ids={list(template.image_token_ids)}, but this {config.model_type!r} "
                f"model's config names the placeholder ids {sorted(missing)}: calibrate this model (blindsight "
                "calibrate), or pass the right BackendOptions(template=...)") from None
        return
    for name in ("image_open_ids", "image_close_ids", "image_token_ids"):
        if set(getattr(own, name)) != set(getattr(template, name)):
            raise ProfileMismatchError(
                f"{where} has {name}={list(getattr(template, name))}, but this {config.model_type!r} model's "
                f"config names {list(getattr(own, name))}: calibrate this model (blindsight calibrate), or pass "
                "the right BackendOptions(template=...)")


def file_version(calibration: Mapping) -> int:
    """The format version a profile with this ``calibration`` block is written as: 2 for per-layer thresholds
    (which a version-1 reader would not apply when it re-decides), else 1, which every BlindSight reads."""
    return 2 if isinstance(calibration.get("thresholds"), (list, tuple)) else 1


def _check_version(version, source: str) -> int:
    if not is_int(version):  # 1.0 and true compare equal to 1 but are not what any BlindSight wrote
        raise ProfileFormatError(f'{source}: "version" must be an integer (1 or 2), got {show(version)}')
    if version not in READABLE_VERSIONS:
        raise ProfileFormatError(
            f"{source}: profile format version {version!r} is not supported (this BlindSight reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
            + ("; upgrade blindsight to read it." if version > PROFILE_VERSION else ".")
        )
    return version


def _model_fields(m) -> dict:
    """The file's ``model`` object, checked field by field (names as in the file: ``model.<field>``)."""
    _check_object(m, "model", [f.name for f in fields(ModelInfo)], "model", optional=("template",))
    _check_model_fields(m, "model")
    return m


def _file_categories(categories) -> tuple[tuple[str, ...], ...]:
    """``categories[layer][head]``: the JSON names only (a number or bool in a file is a mistake, not a code)."""
    if not isinstance(categories, list) or not all(isinstance(layer, list) for layer in categories):
        raise ValueError(f"categories must be a list of layers, each a list of category names, got {show(categories)}")
    names = [c.json_name for c in Category]
    for i, layer in enumerate(categories):
        for h, name in enumerate(layer):
            if not isinstance(name, str) or name not in names:
                raise ValueError(f"categories[{i}][{h}]: unknown category {show(name)}; expected one of {names}")
    return tuple(tuple(layer) for layer in categories)


def _calibration_settings(calibration, model: ModelInfo, version: int = 1) -> dict:
    """The ``calibration`` object; the settings :meth:`Profile.decide` reuses are checked now, not at a later
    decide, and so are the version they need, the records :meth:`Profile.summary` prints (``samples``,
    ``source``, ``tool_version``, ``video_segments``) and the type of the ``tune`` record (``blindsight tune``).
    Other keys are kept as they are and never read."""
    if calibration is None:
        calibration = {}
    if not isinstance(calibration, dict):
        raise ValueError(f"calibration must be an object, got {show(calibration)}")
    needs = file_version(calibration)
    if needs != version:
        raise ValueError("calibration.thresholds is a list of per-layer thresholds, which needs format version 2"
                         if needs == 2 else "format version 2 is for per-layer calibration.thresholds (a list of one "
                         "mapping per layer), but this file has one setting for all layers: write it as version 1")
    if "tune" in calibration and not isinstance(calibration["tune"], dict):
        raise ValueError(f"calibration.tune must be an object, got {show(calibration['tune'])}")
    for key in ("source", "tool_version"):
        if key in calibration and not isinstance(calibration[key], str):
            raise ValueError(f"calibration.{key} must be a string, got {show(calibration[key])}")
    if "samples" in calibration:
        _check_count(calibration["samples"], "calibration.samples")
    if "video_segments" in calibration:
        _check_video_report(calibration["video_segments"], "calibration.video_segments")
    thresholds = calibration.get("thresholds")
    if isinstance(thresholds, list):  # None in decide()'s argument keeps a layer's setting: a file has no other
        for i, t in enumerate(thresholds):
            if t is None:
                raise ValueError(f"calibration.thresholds[{i}] must be a number or a mapping {{category: number}}, "
                                 "got None")
    for key, check in (("thresholds", lambda: layer_thresholds(thresholds, model.num_layers)),
                       ("quantile", lambda: check_quantile(calibration.get("quantile", 0.0))),
                       ("dense_layers", lambda: check_dense_layers(calibration.get("dense_layers", ()),
                                                                   model.num_layers))):
        try:
            check()
        except ValueError as e:
            raise ValueError(f"calibration.{key}: {e}") from None
    return dict(calibration)


def check_scores(scores, num_layers: int, num_heads: int) -> None:
    """ValueError naming the field unless ``scores`` is what :func:`calibrate` stores: ``statistic`` "recall",
    ``categories`` in SPARSE_CATEGORIES order (the order of each recall triple: another order would silently
    swap categories), and ``prompts[i].recall`` of shape ``[num_layers][num_heads][3]`` with values in [0, 1]."""
    if not isinstance(scores, Mapping):
        raise ValueError(f"scores must be an object, got {type(scores).__name__}")
    statistic = scores.get("statistic")
    if not isinstance(statistic, str) or statistic != "recall":
        raise ValueError(f'scores.statistic must be "recall", got {show(statistic)}')
    expected = [c.json_name for c in SPARSE_CATEGORIES]
    if scores.get("categories") != expected:
        raise ValueError(f"scores.categories must be {expected} (the order of each stored recall triple), "
                         f"got {show(scores.get('categories'))}")
    prompts = scores.get("prompts")
    if not isinstance(prompts, list):
        raise ValueError(f"scores.prompts must be a list, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError('scores.prompts is empty (a profile without calibration statistics has "scores": null)')
    for i, prompt in enumerate(prompts):
        where = f"scores.prompts[{i}]"
        if not isinstance(prompt, Mapping):
            raise ValueError(f"{where} must be an object, got {type(prompt).__name__}")
        if "recall" not in prompt:
            raise ValueError(f"{where}.recall is missing")
        _check_recall(prompt["recall"], f"{where}.recall", num_layers, num_heads)
        for key, minimum in (("sample", 0), ("row", 0), ("image_rows", 1)):  # records, written by calibrate
            if key in prompt:
                _check_count(prompt[key], f"{where}.{key}", minimum)
        if "video_segments" in prompt:  # the recall under the other choice of video segments
            other = prompt["video_segments"]
            if not isinstance(other, Mapping):
                raise ValueError(f"{where}.video_segments must be an object {{choice: recall}}, got {show(other)}")
            for choice, recall in other.items():
                if choice not in VIDEO_SEGMENTS:
                    raise ValueError(f"{where}.video_segments.{choice} is not one of {list(VIDEO_SEGMENTS)}")
                _check_recall(recall, f"{where}.video_segments.{choice}", num_layers, num_heads)


def _check_count(v, where: str, minimum: int = 0) -> None:
    if not is_int_in(v, minimum, MAX_COUNT):
        raise ValueError(f"{where} must be an int in [{minimum}, {MAX_COUNT}], got {show(v)}")


def _check_recall_value(v, where: str) -> None:
    if not is_number(v) or not -RECALL_SLACK <= v <= 1 + RECALL_SLACK:  # NaN fails too
        raise ValueError(f"{where} must be a recall in [0, 1], got {show(v)}")


def _check_object(obj, where: str, names: list[str], kind: str, optional=()) -> None:
    """``obj`` is a JSON object with exactly the fields ``names`` (those in ``optional`` may be absent)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be an object with {names}, got {show(obj)}")
    for key in obj:
        if key not in names:
            raise ValueError(f"{where}.{key} is not a {kind} field (fields: {names})")
    for name in names:
        if name not in obj and name not in optional:
            raise ValueError(f"{where}.{name} is missing")


def _check_video_report(report, where: str) -> None:
    """``calibration.video_segments``: ``{"prompts": n, "video": {category: mean recall}, "frame": {...}}``."""
    names = [c.json_name for c in SPARSE_CATEGORIES]
    _check_object(report, where, ["prompts", *VIDEO_SEGMENTS], "video report")
    _check_count(report["prompts"], f"{where}.prompts", 1)
    for choice in VIDEO_SEGMENTS:
        means = report[choice]
        if not isinstance(means, dict) or sorted(means) != sorted(names):
            raise ValueError(f"{where}.{choice} must be an object {{{', '.join(names)}: mean recall}}, got "
                             f"{show(means)}")
        for c in names:
            _check_recall_value(means[c], f"{where}.{choice}.{c}")


def _check_list(value, length: int, where: str, what: str) -> None:
    if not isinstance(value, list) or len(value) != length:
        got = f"{len(value)} entries" if isinstance(value, list) else type(value).__name__
        raise ValueError(f"{where} must be a list of {length} {what}, got {got}")


def _check_recall(recall, where: str, num_layers: int, num_heads: int) -> None:
    """``recall[layer][head][category]``, by loops rather than a tensor so the message names the entry."""
    names = [c.json_name for c in SPARSE_CATEGORIES]
    _check_list(recall, num_layers, where, "layers")
    for i, layer in enumerate(recall):
        _check_list(layer, num_heads, f"{where}[{i}]", "heads")
        for h, head in enumerate(layer):
            _check_list(head, len(names), f"{where}[{i}][{h}]", f"recalls {names}")
            for c, v in enumerate(head):
                _check_recall_value(v, f"{where}[{i}][{h}][{c}]")
