"""Where the images are in a prompt: `Template`, `Layout`, and the compact layout spec.

Semantics (DESIGN.md §1): an *image segment* runs from an open delimiter through its matching close
delimiter, both included; with no delimiters in the template, a segment is a maximal run of image
placeholder tokens. ``image[b, t]`` is the segment index of token t in row b (0, 1, ...) or -1 for text;
padding counts as text. ``sink[b, t]`` marks the first ``sinks_per_image`` tokens of every segment.
Malformed prompts raise :class:`LayoutError` naming the row and the position; nothing is guessed.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import re
import sys
import threading
import warnings
from dataclasses import dataclass, field

import torch

from . import hf
from .stats import count

__all__ = ["Template", "Layout", "LayoutError", "parse_layout_spec", "input_ids_from_spec", "use_layout",
           "image_segments", "active_layout", "layout_from_ids", "enclosing_input_ids", "prompt_layout"]


class LayoutError(ValueError):
    """The prompt's image delimiters or placeholders do not form well-formed image segments."""


@dataclass(frozen=True)
class Template:
    """How a model marks images in ``input_ids``: one of three delimiter schemes.

    - *open/close pairs* (Qwen-VL, Gemma-3, GLM-4V, InternVL, Llama-4): ``image_open_ids[i]`` is closed by
      ``image_close_ids[i]``; a segment runs from its open through its close, and every token between them
      (placeholders, row breaks, tile separators, newlines) belongs to the image. One id may be both open i and
      close i (Idefics3/SmolVLM's ``<fake_token_around_image>``, which also separates an image's tiles): it then
      closes the segment only once one of ``final_part_ids`` (``<global-img>``, the image's last part) has
      begun, and separates tiles before that.
    - *close only* (Pixtral/Mistral-3): no open ids; a segment is a run of ``image_token_ids`` (``[IMG]``,
      ``[IMG_BREAK]``) ended by a close id (``[IMG_END]``), which belongs to it.
    - *no delimiters* (LLaVA-OneVision): a segment is a maximal run of one placeholder id. Two images with no
      token between them are one segment: their ids cannot tell them apart.

    ``image_token_ids`` are the ids that stand for image content (placeholders, and in close-only templates
    every id inside an image). The first ``sinks_per_image`` tokens of every segment are its sinks.
    """

    image_open_ids: tuple[int, ...]
    image_close_ids: tuple[int, ...]
    image_token_ids: tuple[int, ...]
    sinks_per_image: int = 1
    final_part_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("image_open_ids", "image_close_ids", "image_token_ids", "final_part_ids"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        opens, closes = self.image_open_ids, self.image_close_ids
        if opens and len(opens) != len(closes):
            raise ValueError(
                "Template: image_open_ids and image_close_ids are parallel (open i is closed by close i); "
                f"got {len(opens)} open and {len(closes)} close ids"
            )
        if not self.image_token_ids:
            raise ValueError("Template: image_token_ids must name at least one placeholder id")
        toggles = self.toggle_ids
        ids = opens + tuple(c for c in closes if c not in toggles) + self.image_token_ids + self.final_part_ids
        if len(set(ids)) != len(ids):
            raise ValueError(f"Template: open, close, placeholder and final-part ids must all differ (an id may be "
                             f"both open i and close i), got {opens}, {closes}, {self.image_token_ids}, "
                             f"{self.final_part_ids}")
        if any(o in closes and closes.index(o) != i for i, o in enumerate(opens)):
            raise ValueError(f"Template: an id that is both open and close must close the segment it opens, got "
                             f"image_open_ids={opens}, image_close_ids={closes}")
        if bool(toggles) != bool(self.final_part_ids):
            raise ValueError("Template: an id that both opens and closes an image needs final_part_ids (the ids that "
                             "start an image's last part, after which it closes), and final_part_ids need such an id")
        if self.sinks_per_image < 1:
            raise ValueError(f"Template: sinks_per_image must be >= 1, got {self.sinks_per_image}")

    @property
    def has_delimiters(self) -> bool:
        """Whether images are found by delimiters (open/close pairs or close-only) rather than as placeholder runs."""
        return bool(self.image_open_ids or self.image_close_ids)

    @property
    def toggle_ids(self) -> tuple[int, ...]:
        """Ids that are both an open and a close delimiter."""
        return tuple(i for i in self.image_open_ids if i in self.image_close_ids)

    @classmethod
    def from_config(cls, config, sinks_per_image: int = 1) -> Template:
        """The template of a transformers VLM config (or a model: its ``.config`` is used), for the families whose
        config names every image id (``hf.CONFIG_TEMPLATE_TYPES``)."""
        return cls(*hf.template_ids(config), sinks_per_image)

    @classmethod
    def from_processor(cls, processor, sinks_per_image: int = 1) -> Template:
        """The template of a transformers processor (or its tokenizer), for the families whose delimiters only the
        tokenizer knows (``hf.PROCESSOR_TEMPLATES``: InternVL, Pixtral/Mistral-3, Idefics3/SmolVLM)."""
        ids = hf.processor_template_ids(processor)
        return cls(*ids[:3], sinks_per_image, *ids[3:])

    @classmethod
    def from_pretrained(cls, path, sinks_per_image: int = 1) -> Template:
        """The template of a saved model directory: from its config where the config names every image id, else
        from its processor."""
        from transformers import AutoConfig, AutoProcessor

        config = AutoConfig.from_pretrained(path)
        if hf.config_names_template(config):
            return cls.from_config(config, sinks_per_image)
        return cls.from_processor(AutoProcessor.from_pretrained(path), sinks_per_image)

    def to_dict(self) -> dict:
        d = {
            "image_open_ids": list(self.image_open_ids),
            "image_close_ids": list(self.image_close_ids),
            "image_token_ids": list(self.image_token_ids),
            "sinks_per_image": self.sinks_per_image,
        }
        if self.final_part_ids:  # written only when used: files without it read as before
            d["final_part_ids"] = list(self.final_part_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Template:
        return cls(
            tuple(d["image_open_ids"]),
            tuple(d["image_close_ids"]),
            tuple(d["image_token_ids"]),
            int(d.get("sinks_per_image", 1)),
            tuple(d.get("final_part_ids", ())),
        )


@dataclass(frozen=True, eq=False)
class Layout:
    """Per-token image membership of a batch of prompts.

    ``image``: int32 ``[B, S]``, segment index or -1 for text/padding. ``sink``: bool ``[B, S]``.
    ``key`` is a digest of both, so equal layouts share cached block masks.
    """

    image: torch.Tensor
    sink: torch.Tensor
    key: str = field(default="", compare=False)

    def __post_init__(self):
        if self.image.dim() != 2 or self.image.shape != self.sink.shape:
            raise ValueError(f"Layout: image and sink must both be [B, S]; got {self.image.shape}, {self.sink.shape}")
        object.__setattr__(self, "image", self.image.to(torch.int32))
        object.__setattr__(self, "sink", self.sink.to(torch.bool))
        if not self.key:  # a new layout (``to`` keeps the key of a checked one): check it, then digest it
            image, sink = self.image.cpu(), self.sink.cpu()
            _check_layout(image, sink)
            h = hashlib.blake2b(digest_size=16)
            h.update(str(tuple(self.image.shape)).encode())
            h.update(image.numpy().tobytes())
            h.update(sink.numpy().tobytes())
            object.__setattr__(self, "key", h.hexdigest())
        object.__setattr__(self, "_has_images", bool((self.image >= 0).any()))

    @property
    def batch_size(self) -> int:
        return self.image.shape[0]

    @property
    def seq_len(self) -> int:
        return self.image.shape[1]

    @property
    def num_images(self) -> torch.Tensor:
        """Number of image segments per row, int ``[B]``."""
        return (self.image.max(dim=1).values + 1).clamp_min(0)

    @property
    def has_images(self) -> bool:
        return self._has_images

    def to(self, device) -> Layout:
        if self.image.device == torch.device(device):
            return self
        return Layout(self.image.to(device), self.sink.to(device), self.key)

    def segments(self, row: int = 0) -> list[tuple[int, int]]:
        """``(start, end)`` (end exclusive) of each image segment of ``row``."""
        return [(start, end) for _, start, end in image_segments(self.image[row])]

    def __repr__(self) -> str:
        return f"Layout(B={self.batch_size}, S={self.seq_len}, images={self.num_images.tolist()}, key={self.key[:8]})"

    @classmethod
    def from_input_ids(cls, input_ids: torch.Tensor, template: Template, attention_mask=None) -> Layout:
        """Find the image segments of ``input_ids`` ``[B, S]`` (or ``[S]``).

        Positions where the 2-D ``attention_mask`` is 0 are padding: text, whatever their ids.
        """
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"Layout.from_input_ids: input_ids must be [B, S], got shape {tuple(ids.shape)}")
        ids = ids.cpu().long()
        real = torch.ones_like(ids, dtype=torch.bool)
        if attention_mask is not None:
            am = torch.as_tensor(attention_mask).cpu()
            if am.shape != ids.shape:
                raise ValueError(
                    f"Layout.from_input_ids: attention_mask shape {tuple(am.shape)} != input_ids shape "
                    f"{tuple(ids.shape)}"
                )
            real = am.bool()
        is_img = torch.isin(ids, torch.tensor(template.image_token_ids)) & real
        if template.image_open_ids:
            opens, closes = _delimiters(ids, real, template)
            _check_delimiters(ids, opens, closes, is_img, template, real)
            # depth after each token, counting the close token itself as inside its segment
            depth = torch.cumsum(opens.int() - closes.int(), dim=1)
            inside = (depth > 0) | closes
        elif template.image_close_ids:  # close only: runs of placeholders, each ended by its close
            closes = torch.isin(ids, torch.tensor(template.image_close_ids)) & real
            inside = is_img | closes
            _check_closed_runs(is_img, closes)
            prev_open_run = torch.nn.functional.pad(is_img, (1, 0))[:, :-1]
            opens = inside & ~prev_open_run
        else:  # maximal runs of one placeholder id
            prev = torch.nn.functional.pad(ids, (1, 0), value=-1)[:, :-1]
            prev_img = torch.nn.functional.pad(is_img, (1, 0))[:, :-1]
            opens = is_img & ~(prev_img & (prev == ids))
            inside = is_img
        seg = torch.cumsum(opens.int(), dim=1) - 1
        image = torch.where(inside, seg, torch.full_like(seg, -1))
        # position of each token within its segment: t - (start of segment)
        t = torch.arange(ids.shape[1]).expand_as(ids)
        start = torch.cummax(torch.where(opens, t, torch.zeros_like(t)), dim=1).values
        sink = inside & (t - start < template.sinks_per_image)
        return cls(image, sink)

    @classmethod
    def from_spec(cls, spec: str, template: Template) -> Layout:
        """The layout of :func:`input_ids_from_spec` (batch 1)."""
        return cls.from_input_ids(input_ids_from_spec(spec, template), template)


def image_segments(image_row: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(image id, start, end)`` (end exclusive) of each image segment of one row of :attr:`Layout.image`
    (segments are contiguous by definition)."""
    pos = (image_row >= 0).nonzero().flatten()
    if pos.numel() == 0:
        return []
    ids = image_row[pos]
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[1:] = ids[1:] != ids[:-1]
    ends = torch.ones_like(starts)
    ends[:-1] = starts[1:]
    return list(zip(ids[starts].tolist(), pos[starts].tolist(), (pos[ends] + 1).tolist()))


def _check_layout(image: torch.Tensor, sink: torch.Tensor) -> None:
    """Raise LayoutError unless every row's segments are contiguous, numbered 0, 1, ... in order, and every
    sink is an image token: what every lowering assumes (a hand-made Layout is checked like a parsed one)."""
    if image.numel() == 0:
        return
    if bool((image < -1).any()):
        row, pos = (image < -1).nonzero()[0].tolist()
        raise LayoutError(f"row {row}, position {pos}: image id {int(image[row, pos])} (text is -1, images 0, 1, ...)")
    bad_sink = sink & (image < 0)
    if bool(bad_sink.any()):
        row, pos = bad_sink.nonzero()[0].tolist()
        raise LayoutError(f"row {row}, position {pos}: a sink flag on a text token (sinks are image tokens)")
    prev = torch.nn.functional.pad(image, (1, 0), value=-1)[:, :-1]
    starts = (image >= 0) & (image != prev)
    # the k-th segment start of a row must carry id k: ids in order, none reused after a gap
    expected = torch.cumsum(starts.int(), dim=1) - 1
    bad = starts & (image != expected)
    if bool(bad.any()):
        row, pos = bad.nonzero()[0].tolist()
        raise LayoutError(f"row {row}, position {pos}: image id {int(image[row, pos])} starts a segment where "
                          f"id {int(expected[row, pos])} was expected (each image's tokens must be one contiguous "
                          "run, numbered 0, 1, ... in order)")


def _delimiters(ids, real, template: Template) -> tuple[torch.Tensor, torch.Tensor]:
    """``(opens, closes)`` bool ``[B, S]`` of a template with open ids. An id that is both open and close
    (``toggle_ids``) opens when no image is open and closes once a ``final_part_ids`` token came after the
    previous such id; otherwise it separates tiles (neither)."""
    opens = torch.isin(ids, torch.tensor(template.image_open_ids)) & real
    closes = torch.isin(ids, torch.tensor(template.image_close_ids)) & real
    if not template.toggle_ids:
        return opens, closes
    toggle = torch.isin(ids, torch.tensor(template.toggle_ids)) & real
    final = torch.isin(ids, torch.tensor(template.final_part_ids)) & real
    t = torch.arange(ids.shape[1]).expand_as(ids)
    none = torch.full_like(t, -1)

    def last_before(flags):  # position of the latest flagged token before t, or -1
        last = torch.cummax(torch.where(flags, t, none), dim=1).values
        return torch.nn.functional.pad(last, (1, 0), value=-1)[:, :-1]

    prev_toggle = last_before(toggle)
    ends = toggle & (last_before(final) > prev_toggle)  # a final part began since the previous toggle
    prev_ended = ends.gather(1, prev_toggle.clamp_min(0)) & (prev_toggle >= 0)
    starts = toggle & ((prev_toggle < 0) | prev_ended)
    other = ~toggle
    return (opens & other) | starts, (closes & other) | (ends & ~starts)


def _check_closed_runs(is_img, closes) -> None:
    """Raise LayoutError unless every placeholder run of a close-only template ends with a close id."""
    nxt = torch.nn.functional.pad(is_img | closes, (0, 1))[:, 1:]
    prev_img = torch.nn.functional.pad(is_img, (1, 0))[:, :-1]
    unclosed = is_img & ~nxt
    lone = closes & ~prev_img
    for flags, what in ((unclosed, "image placeholders are not closed by a close delimiter"),
                        (lone, "close delimiter without image placeholders before it")):
        if bool(flags.any()):
            row, pos = flags.nonzero()[0].tolist()
            raise LayoutError(f"row {row}, position {pos}: {what}")


def _check_delimiters(ids, opens, closes, is_img, template: Template, real) -> None:
    """Raise LayoutError at the first malformed position of the first malformed row."""
    depth = torch.cumsum(opens.int() - closes.int(), dim=1)
    inside_before = torch.nn.functional.pad(depth, (1, 0))[:, :-1] > 0  # depth before token t
    stray_final = torch.isin(ids, torch.tensor(template.final_part_ids or (-1,))) & real & ~inside_before
    bad = (depth < 0) | (depth > 1) | (is_img & ~inside_before) | stray_final
    last_bad = depth[:, -1] != 0 if ids.shape[1] else torch.zeros(ids.shape[0], dtype=torch.bool)
    # matching pairs: the open id's index must equal the close id's index
    if len(template.image_open_ids) > 1:
        open_kind = torch.zeros_like(ids)
        for i, o in enumerate(template.image_open_ids):
            open_kind[ids == o] = i + 1
        current = torch.cummax(torch.where(opens, open_kind, torch.zeros_like(ids)), dim=1).values
        close_kind = torch.zeros_like(ids)
        for i, c in enumerate(template.image_close_ids):
            close_kind[ids == c] = i + 1
        bad |= closes & (close_kind != current)
    if not (bad.any() or last_bad.any()):
        return
    for row in range(ids.shape[0]):
        pos = bad[row].nonzero().flatten()
        if len(pos):
            p = int(pos[0])
            tok = int(ids[row, p])
            if is_img[row, p]:
                what = f"image placeholder {tok} outside any image segment"
            elif stray_final[row, p]:
                what = f"final-part id {tok} outside any image segment"
            elif depth[row, p] > 1:
                what = f"nested open delimiter {tok} (an image is already open)"
            elif depth[row, p] < 0:
                what = f"close delimiter {tok} without an open one"
            else:
                what = f"close delimiter {tok} does not match the open delimiter of its segment"
            raise LayoutError(f"row {row}, position {p}: {what}")
        if last_bad[row]:
            p = int((opens[row].nonzero().flatten())[-1])
            raise LayoutError(f"row {row}, position {p}: open delimiter {int(ids[row, p])} is never closed")


_SPEC_ITEM = re.compile(r"\s*(text|image)\s*:\s*(\d+)\s*")


def parse_layout_spec(spec: str) -> list[tuple[str, int]]:
    """Parse ``"text:64,(image:496,text:16)x16,text:80"`` into ``[("text", 64), ("image", 496), ...]``.

    ``image:N`` is one image of N tokens in all (delimiters included); ``(...)xK`` repeats a group K times.
    """
    pos = 0

    def parse_list(end_char):
        nonlocal pos
        items = []
        while True:
            while pos < len(spec) and spec[pos].isspace():
                pos += 1
            if pos < len(spec) and spec[pos] == "(":
                pos += 1
                group = parse_list(")")
                m = re.compile(r"\s*x\s*(\d+)").match(spec, pos)
                if not m:
                    raise ValueError(f"layout spec {spec!r}: expected 'xN' after ')' at position {pos}")
                pos = m.end()
                items.extend(group * int(m.group(1)))
            else:
                m = _SPEC_ITEM.match(spec, pos)
                if not m:
                    raise ValueError(
                        f"layout spec {spec!r}: expected 'text:N', 'image:N' or '(...)xK' at position {pos}"
                    )
                pos = m.end()
                items.append((m.group(1), int(m.group(2))))
            if pos < len(spec) and spec[pos] == ",":
                pos += 1
                continue
            if end_char == ")" and pos < len(spec) and spec[pos] == ")":
                pos += 1
                return items
            if end_char is None and pos == len(spec):
                return items
            raise ValueError(f"layout spec {spec!r}: unexpected character at position {pos}")

    items = parse_list(None)
    for kind, n in items:
        if n < 1:
            raise ValueError(f"layout spec {spec!r}: {kind}:{n} must have at least one token")
    return items


def input_ids_from_spec(spec: str, template: Template, text_token_id: int = 0) -> torch.Tensor:
    """``input_ids`` ``[1, S]`` for a layout spec: ``image:N`` = open + (N-2) placeholders + close."""
    reserved = set(template.image_open_ids + template.image_close_ids + template.image_token_ids)
    if text_token_id in reserved:
        raise ValueError(f"text_token_id {text_token_id} is one of the template's image ids")
    out: list[int] = []
    for kind, n in parse_layout_spec(spec):
        if kind == "text":
            out += [text_token_id] * n
        elif template.image_open_ids:
            final = list(template.final_part_ids[:1] if template.image_open_ids[0] in template.toggle_ids else ())
            if n < 3 + len(final):
                raise ValueError(f"layout spec {spec!r}: image:{n} needs >= {3 + len(final)} tokens (open, "
                                 f"{'final part, ' if final else ''}placeholder, close)")
            out += ([template.image_open_ids[0]] + final + [template.image_token_ids[0]] * (n - 2 - len(final))
                    + [template.image_close_ids[0]])
        elif template.image_close_ids:
            if n < 2:
                raise ValueError(f"layout spec {spec!r}: image:{n} needs >= 2 tokens (placeholder, close)")
            out += [template.image_token_ids[0]] * (n - 1) + [template.image_close_ids[0]]
        else:
            out += [template.image_token_ids[0]] * n
    return torch.tensor([out], dtype=torch.long)


# ---- where the run time finds a prompt's layout ----------------------------------------------------------
_ACTIVE_LAYOUT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("blindsight_layout", default=None)


@contextlib.contextmanager
def use_layout(layout: Layout):
    """Use this layout for every BlindSight attention call inside the block (e.g. a model fed ``inputs_embeds``)."""
    if not isinstance(layout, Layout):
        raise TypeError(f"use_layout needs a blindsight.Layout, got {type(layout).__name__}")
    token = _ACTIVE_LAYOUT.set(layout)
    try:
        yield layout
    finally:
        _ACTIVE_LAYOUT.reset(token)


def active_layout() -> Layout | None:
    """The layout of the innermost :func:`use_layout` block, or None."""
    return _ACTIVE_LAYOUT.get()


_MEMO: list = []  # [(ids copy, mask copy, template, layout)], newest first
_MEMO_LOCK = threading.Lock()
_MEMO_SIZE = 4


def layout_from_ids(input_ids: torch.Tensor, template: Template, attention_mask=None) -> Layout:
    """:meth:`Layout.from_input_ids`, memoized on the *content* of the ids and mask (every graph and every layer
    of one forward asks; a reused buffer with new content is a new prompt). Works on inference tensors."""
    with _MEMO_LOCK:
        for ids, mask, tpl, layout in _MEMO:
            if (tpl == template and ids.shape == input_ids.shape and ids.device == input_ids.device
                    and torch.equal(ids, input_ids) and _same_mask(mask, attention_mask)):
                return layout
    layout = Layout.from_input_ids(input_ids, template, attention_mask)
    entry = (input_ids.detach().clone(), None if attention_mask is None else attention_mask.detach().clone(),
             template, layout)
    with _MEMO_LOCK:
        _MEMO.insert(0, entry)
        del _MEMO[_MEMO_SIZE:]
    return layout


def _same_mask(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.device == b.device and torch.equal(a, b)


_INTERNAL_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def enclosing_input_ids(max_frames: int = 200):
    """``(input_ids, attention_mask)`` of the innermost running model call that has them, else ``(None, None)``.

    Walks up the Python stack (skipping torch's and BlindSight's own frames) through the frames of
    ``nn.Module`` methods, and returns the first ``input_ids`` local that is a 2-D integer tensor, with that
    frame's ``attention_mask`` if it is 2-D. It stops at the first frame that is not a module method (the
    caller's own code). Every frame it looks at is still running, so the ids always belong to the forward call
    in progress: a call made with ``inputs_embeds`` only never inherits an earlier prompt's ids. Qwen2-VL's
    language model, for one, sees only ``inputs_embeds``; the VLM's forward that called it holds the ids.
    """
    f = sys._getframe(1)
    for _ in range(max_frames):
        if f is None:
            break
        code = f.f_code
        if not code.co_filename.startswith(_INTERNAL_DIRS):
            local = f.f_locals
            if not isinstance(local.get("self"), torch.nn.Module):
                break
            ids = local.get("input_ids")
            if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
                mask = local.get("attention_mask")
                mask = mask if isinstance(mask, torch.Tensor) and mask.shape == ids.shape else None
                return ids, mask
        f = f.f_back
    return None, None


def prompt_layout(template: Template | None, ids=None, mask=None,
                  warn: bool = False) -> tuple[Layout | None, str | None]:
    """``(layout, None)`` for the attention calls about to run, or ``(None, reason)``: the one layout source of
    the compiled and the eager path. Order: :func:`use_layout`; the given ``ids``/``mask`` (a graph's own
    ``input_ids`` input); :func:`enclosing_input_ids`. A malformed prompt gives reason ``malformed_prompt``
    (counted as ``malformed_prompts``; ``warn``: with the LayoutError's text)."""
    layout = active_layout()
    if layout is not None:
        return layout, None
    if template is None:
        return None, "no_template"
    if ids is None:
        ids, mask = enclosing_input_ids()
    if ids is None:
        return None, "no_layout"
    if mask is not None and mask.shape != ids.shape:
        mask = None
    try:
        return layout_from_ids(ids, template, mask), None
    except LayoutError as e:
        count("malformed_prompts")
        if warn:
            warnings.warn(f"BlindSight: malformed prompt, running dense: {e}", stacklevel=3)
        return None, "malformed_prompt"
