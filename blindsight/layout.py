"""Where the images are in a prompt: `Layout`, the compact layout spec, and where a call's layout comes from.

Semantics (DESIGN.md §1): ``image[b, t]`` is the index of the image segment token t of row b belongs to (0, 1,
...) or -1 for text; padding counts as text. ``sink[b, t]`` marks the first ``sinks_per_image`` tokens of every
segment. The segments follow from a :class:`~blindsight.template.Template` (re-exported here); malformed prompts
raise :class:`LayoutError` naming the row and the position; nothing is guessed.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import re
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from .cache import BoundedCache, tensor_digest
from .sequence import RunningPrompt, remember, running_model_calls, running_prompts, sequence_ids
from .stats import count
from .template import LayoutError, Template, find_segments

__all__ = ["Layout", "parse_layout_spec", "input_ids_from_spec", "use_layout",
           "image_segments", "active_layout", "layout_from_ids", "enclosing_video_grid",
           "prompt_layout"]


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
    def from_input_ids(cls, input_ids: torch.Tensor, template: Template, attention_mask=None,
                       video_grid_thw=None, open_end: bool = False) -> Layout:
        """Find the image segments of ``input_ids`` ``[B, S]`` (or ``[S]``): :func:`blindsight.template.find_segments`.

        Positions where the 2-D ``attention_mask`` is 0 are padding: text, whatever their ids. ``video_grid_thw``:
        the prompt's video grids, needed by ``Template(video_segments="frame")`` for Qwen2/2.5-VL videos.
        ``open_end``: the ids are the start of a sequence (the tokens so far of a prompt prefilled in chunks), so a
        row may end inside an image: that segment runs to the end, as it does in the whole prompt (DESIGN §2).
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
        try:
            return cls(*find_segments(ids, real, template, video_grid_thw))
        except LayoutError:
            if not open_end:
                raise
        rows = [_open_ended_row(ids[b:b + 1], real[b:b + 1], template, video_grid_thw if len(ids) == 1 else None)
                for b in range(ids.shape[0])]
        return cls(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]))

    def last(self, n: int) -> Layout:
        """The layout of the last ``n`` positions (the keys a sliding-window cache keeps): segments keep their
        tokens and sinks, renumbered from 0; a segment that started earlier has its sinks outside."""
        image, sink = self.image[:, -n:], self.sink[:, -n:]
        first = torch.where(image >= 0, image, torch.iinfo(torch.int32).max).min(dim=1, keepdim=True).values
        image = torch.where(image >= 0, image - first, image)  # rows without images keep their -1
        return Layout(image, sink)

    @classmethod
    def from_spec(cls, spec: str, template: Template) -> Layout:
        """The layout of :func:`input_ids_from_spec` (batch 1)."""
        return cls.from_input_ids(input_ids_from_spec(spec, template), template)


def _open_ended_row(ids: torch.Tensor, real: torch.Tensor, template: Template, video_grid_thw):
    """``(image, sink)`` of one row that may end inside an image: the row as it is, or closed by the fewest
    delimiters that make it well formed (a close; two, for a frame inside a video; a final part and a close),
    cut back to its length. Only ids after the row change, so every token keeps the segment it has in the
    whole prompt. Raises the row's own LayoutError if no such ending exists (it is malformed before its end)."""
    S = ids.shape[1]
    closes = list(dict.fromkeys(template.image_close_ids))
    endings = [[]] + [[c] for c in closes] + [[c, d] for c in closes for d in closes] + [
        [f, c] for f in template.final_part_ids for c in closes]
    first = None
    for ending in endings:
        tail = torch.tensor([ending], dtype=ids.dtype)
        tail_real = torch.ones_like(tail, dtype=torch.bool)
        try:
            image, sink = find_segments(torch.cat([ids, tail], 1), torch.cat([real, tail_real], 1), template,
                                        video_grid_thw)
        except LayoutError as e:
            first = first or e
            continue
        return image[:, :S], sink[:, :S]
    raise first


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


_SPEC_ITEM = re.compile(r"\s*(text|image)\s*:\s*(\d+)\s*")


def parse_layout_spec(spec: str, max_tokens: int = 1 << 24) -> list[tuple[str, int]]:
    """Parse ``"text:64,(image:496,text:16)x16,text:80"`` into ``[("text", 64), ("image", 496), ...]``.

    ``image:N`` is one image of N tokens in all (delimiters included); ``(...)xK`` repeats a group K times. A spec
    of more than ``max_tokens`` tokens (or items) is refused before it is expanded (ValueError), as is one nested
    too deeply.
    """
    pos = 0
    size = [0, 0]  # tokens, items so far

    def number(digits: str) -> int:
        if len(digits) > 18:
            raise ValueError(f"layout spec {spec[:60]!r}: number {digits[:20]}... is too large")
        return int(digits)

    def too_long(tokens: int, items: int) -> None:
        if tokens > max_tokens or items > max_tokens:
            raise ValueError(f"layout spec {spec[:60]!r}{'...' if len(spec) > 60 else ''} is longer than "
                             f"{max_tokens} tokens")

    def parse_list(end_char):
        nonlocal pos
        items = []
        while True:
            while pos < len(spec) and spec[pos].isspace():
                pos += 1
            if pos < len(spec) and spec[pos] == "(":
                pos += 1
                before = list(size)
                group = parse_list(")")
                m = re.compile(r"\s*x\s*(\d+)").match(spec, pos)
                if not m:
                    raise ValueError(f"layout spec {spec!r}: expected 'xN' after ')' at position {pos}")
                pos = m.end()
                k = number(m.group(1))
                tokens, count = size[0] - before[0], size[1] - before[1]  # the group's, once
                size[0], size[1] = before[0] + tokens * k, before[1] + count * k
                too_long(*size)
                items.extend(group * k)
            else:
                m = _SPEC_ITEM.match(spec, pos)
                if not m:
                    raise ValueError(
                        f"layout spec {spec!r}: expected 'text:N', 'image:N' or '(...)xK' at position {pos}"
                    )
                pos = m.end()
                n = number(m.group(2))
                size[0], size[1] = size[0] + n, size[1] + 1
                too_long(*size)
                items.append((m.group(1), n))
            if pos < len(spec) and spec[pos] == ",":
                pos += 1
                continue
            if end_char == ")" and pos < len(spec) and spec[pos] == ")":
                pos += 1
                return items
            if end_char is None and pos == len(spec):
                return items
            raise ValueError(f"layout spec {spec!r}: unexpected character at position {pos}")

    try:
        items = parse_list(None)
    except RecursionError:  # the parser recurses per group
        raise ValueError(f"layout spec {spec[:60]!r}...: groups nested too deeply") from None
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


# (content of the ids, mask, video grids; template) -> Layout: every graph and layer of a forward asks, and
# concurrent forwards (threads of a server) each have their own prompt
_MEMO = BoundedCache("layout.prompts", max_entries=64, max_bytes=64 << 20)


def layout_from_ids(input_ids: torch.Tensor, template: Template, attention_mask=None, video_grid_thw=None) -> Layout:
    """:meth:`Layout.from_input_ids`, memoized on the *content* of the ids, mask and video grids (every graph and
    every layer of one forward asks; a reused buffer with new content is a new prompt), with ``open_end``: the
    ids may be the start of a prompt that is prefilled in chunks. Works on inference tensors."""
    key = (tensor_digest(input_ids), tensor_digest(attention_mask), tensor_digest(video_grid_thw), template)

    def build():
        try:
            return Layout.from_input_ids(input_ids, template, attention_mask, video_grid_thw, open_end=True)
        except LayoutError as e:  # remembered too: every layer of the forward asks again
            return e
    found = _MEMO.get_or_build(key, build)
    if isinstance(found, LayoutError):
        raise LayoutError(*found.args)
    return found


# the ids whose malformed prompt this thread counted last: every graph and layer of one forward reads them
_LAST_MALFORMED: contextvars.ContextVar = contextvars.ContextVar("blindsight_last_malformed", default=None)


def _first_refusal(ids: torch.Tensor) -> bool:
    """Is this the first refusal of this forward's ids? (One forward passes one ids tensor to all its layers.)"""
    last = _LAST_MALFORMED.get()
    if last is not None and last() is ids:
        return False
    _LAST_MALFORMED.set(weakref.ref(ids))
    return True


def enclosing_video_grid():
    """The ``video_grid_thw`` (``[videos, 3]``) of the innermost running model call that has one, else None: what
    per-frame video segments of Qwen2/2.5-VL need besides the ids (:func:`running_model_calls`)."""
    for arg in running_model_calls():
        grid = arg("video_grid_thw")
        if isinstance(grid, torch.Tensor) and grid.dim() == 2 and grid.shape[-1] == 3:
            return grid
    return None


def prompt_layout(template: Template | None, ids=None, mask=None, warn: bool = False, seq_len: int | None = None,
                  prompts: list[RunningPrompt] | None = None,
                  query_len: int | None = None) -> tuple[Layout | None, str | None]:
    """``(layout, None)`` for the attention calls about to run, or ``(None, reason)``: the one layout source of
    the compiled and the eager path. Order: :func:`use_layout`; the given ``ids``/``mask`` (a graph's own
    ``input_ids`` input) or the innermost running model call's (``prompts``: :func:`running_prompts`, found here
    if not given), with :func:`enclosing_video_grid` for per-frame video segments. ``seq_len``: the calls' key
    length; when it is longer than the ids (queries at an offset: a cache holds the earlier tokens), the layout
    is of the whole sequence (:func:`blindsight.sequence.sequence_ids`), its last ``seq_len`` positions when a
    cache keeps only those (a sliding window; also a :func:`use_layout` layout, for a call whose ``query_len`` is
    below ``seq_len``), or the reason is ``unknown_prefix``. A malformed prompt gives
    reason ``malformed_prompt`` (counted as ``malformed_prompts`` once per forward; ``warn``: with the
    LayoutError's text)."""
    layout = active_layout()
    offset = query_len is not None and seq_len is not None and query_len < seq_len
    if layout is not None:
        return (layout.last(seq_len) if offset and layout.seq_len > seq_len else layout), None
    if template is None:
        return None, "no_template"
    prompts = running_prompts() if prompts is None else prompts
    if ids is not None and not (prompts and prompts[0].ids is ids):  # the graph's own input: innermost
        prompts = [RunningPrompt(ids, mask, prompts[0].cache if prompts else None), *prompts]
    if not prompts:
        return None, "no_layout"
    inner = prompts[0]
    ids = inner.ids
    mask = inner.mask if inner.mask is not None and inner.mask.shape == ids.shape else None
    if seq_len is not None and seq_len > ids.shape[1]:
        found = sequence_ids(prompts)
        if found is None or found[0].shape[1] < seq_len:
            return None, "unknown_prefix"
        ids, mask = found
    elif inner.cache is not None:
        remember(inner.cache, ids, mask, inner.ids)  # the start of a sequence that later forwards may continue
    grid = enclosing_video_grid() if template.video_segments == "frame" else None
    try:
        layout = layout_from_ids(ids, template, mask, grid)
    except LayoutError as e:
        if not _first_refusal(inner.ids):
            return None, "malformed_prompt"
        count("malformed_prompts")
        if warn:
            warnings.warn(f"BlindSight: malformed prompt, running dense: {e}", stacklevel=3)
        return None, "malformed_prompt"
    if seq_len is not None and layout.seq_len > seq_len:  # the cache holds the last seq_len tokens only
        layout = layout.last(seq_len)
    return layout, None
