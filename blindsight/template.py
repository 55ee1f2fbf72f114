"""How a model marks images in ``input_ids`` (:class:`Template`), and the image segments that follow from it.

Semantics (DESIGN.md §1): an *image segment* is one image's tokens, delimiters included, found by one of three
delimiter schemes (open/close pairs, close only, no delimiters); every segment's first ``sinks_per_image``
tokens are its sinks. :func:`find_segments` gives ``image[b, t]`` (the segment index of token t in row b, or -1
for text) and ``sink[b, t]``; a malformed prompt raises :class:`LayoutError` naming the row and the position:
nothing is guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import hf

__all__ = ["Template", "LayoutError", "find_segments", "VIDEO_SEGMENTS"]

VIDEO_SEGMENTS = ("video", "frame")


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
    every id inside an image); ``video_token_ids``, a subset, mark videos. The first ``sinks_per_image`` tokens of
    every segment are its sinks.

    Videos (open/close templates with ``video_token_ids``): ``video_segments="video"`` makes a video one segment;
    ``"frame"`` makes each temporal group of frames its own segment. A Qwen3-VL video already writes one pair per
    frame group inside the video's own pair (the only nesting allowed): with ``"frame"`` each inner pair is a
    segment (the outer pair and the timestamps between frames are text), with ``"video"`` the outer pair is.
    A Qwen2/2.5-VL video is one pair of ``t * h * w / merge**2`` placeholders: ``"frame"`` cuts it into its
    ``t = video_grid_thw[i][0]`` equal groups, so its layout needs the prompt's ``video_grid_thw``.
    """

    image_open_ids: tuple[int, ...]
    image_close_ids: tuple[int, ...]
    image_token_ids: tuple[int, ...]
    sinks_per_image: int = 1
    final_part_ids: tuple[int, ...] = ()
    video_token_ids: tuple[int, ...] = ()
    video_segments: str = "video"

    def __post_init__(self):
        for name in ("image_open_ids", "image_close_ids", "image_token_ids", "final_part_ids", "video_token_ids"):
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
        if not set(self.video_token_ids) <= set(self.image_token_ids):
            raise ValueError(f"Template: video_token_ids {self.video_token_ids} must be among image_token_ids "
                             f"{self.image_token_ids}")
        if self.video_segments not in VIDEO_SEGMENTS:
            raise ValueError(f"Template: video_segments must be one of {VIDEO_SEGMENTS}, got {self.video_segments!r}")
        if self.video_segments == "frame" and not (self.video_token_ids and self.image_open_ids):
            raise ValueError('Template: video_segments="frame" needs video_token_ids and open/close delimiters')

    @property
    def has_delimiters(self) -> bool:
        """Whether images are found by delimiters (open/close pairs or close-only) rather than as placeholder runs."""
        return bool(self.image_open_ids or self.image_close_ids)

    @property
    def toggle_ids(self) -> tuple[int, ...]:
        """Ids that are both an open and a close delimiter."""
        return tuple(i for i in self.image_open_ids if i in self.image_close_ids)

    @property
    def nests_videos(self) -> bool:
        """Whether a video's frame pairs may sit inside the video's own pair (open/close templates with videos)."""
        return bool(self.video_token_ids and self.image_open_ids)

    @classmethod
    def from_config(cls, config, sinks_per_image: int = 1, video_segments: str = "video") -> Template:
        """The template of a transformers VLM config (or a model: its ``.config`` is used), for the families whose
        config names every image id (``hf.CONFIG_TEMPLATE_FIELDS``)."""
        return cls(*hf.template_ids(config), sinks_per_image, video_token_ids=hf.video_token_ids(config),
                   video_segments=video_segments)

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
        # written only when used: files without them read as before
        if self.final_part_ids:
            d["final_part_ids"] = list(self.final_part_ids)
        if self.video_token_ids:
            d["video_token_ids"] = list(self.video_token_ids)
        if self.video_segments != "video":
            d["video_segments"] = self.video_segments
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Template:
        return cls(
            tuple(d["image_open_ids"]),
            tuple(d["image_close_ids"]),
            tuple(d["image_token_ids"]),
            int(d.get("sinks_per_image", 1)),
            tuple(d.get("final_part_ids", ())),
            tuple(d.get("video_token_ids", ())),
            d.get("video_segments", "video"),
        )




def find_segments(ids: torch.Tensor, real: torch.Tensor, template: Template,
                  video_grid_thw=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, sink)`` of ``ids`` ``[B, S]`` (int64, CPU) whose real (non-padding) tokens are ``real``.
    ``video_grid_thw``: the prompt's video grids, rows in the order the videos appear (row-major over the batch),
    needed only to cut Qwen2-VL-style videos into frames (``video_segments="frame"``)."""
    is_img = torch.isin(ids, torch.tensor(template.image_token_ids)) & real
    if template.image_open_ids:
        opens, inside = _pair_segments(ids, real, template, is_img, video_grid_thw)
    elif template.image_close_ids:  # close only: runs of placeholders, each ended by its close
        closes = torch.isin(ids, torch.tensor(template.image_close_ids)) & real
        inside = is_img | closes
        _check_closed_runs(is_img, closes)
        prev_img = torch.nn.functional.pad(is_img, (1, 0))[:, :-1]
        opens = inside & ~prev_img
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
    return image, sink


def _pair_segments(ids, real, template: Template, is_img, video_grid_thw) -> tuple[torch.Tensor, torch.Tensor]:
    """``(segment starts, inside a segment)`` of an open/close template, videos as the template says."""
    opens, closes = _delimiters(ids, real, template)
    depth = torch.cumsum(opens.int() - closes.int(), dim=1)  # after each token
    level = depth + closes.int()  # the depth of the pair each token belongs to (0: text)
    root = torch.cumsum((opens & (level == 1)).int(), dim=1) - 1  # index of each token's outermost pair
    root = torch.where(level >= 1, root, torch.full_like(root, -1))
    framed = None
    if template.nests_videos:  # the outermost pairs that hold frame pairs (Qwen3-VL videos)
        holds = _any_per_group(opens & (level == 2), root)
        framed = (root >= 0) & holds.gather(1, root.clamp_min(0))
    _check_delimiters(ids, opens, closes, is_img, template, real, framed)
    if template.video_segments == "video" or framed is None:
        starts, inside = opens & (level == 1), level >= 1
    else:  # each frame pair, and each pair that holds none, is a segment
        leaf = (level == 2) | ((level == 1) & ~framed)
        starts, inside = opens & leaf, leaf
    if template.video_segments == "frame":
        starts = starts | _frame_starts(ids, real, template, root, framed, video_grid_thw)
    return starts, inside


def _any_per_group(flags: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``out[b, g]``: whether any ``flags[b, t]`` has ``group[b, t] == g`` (group ``-1``: none)."""
    out = torch.zeros(flags.shape[0], flags.shape[1] + 1, dtype=torch.int32)
    out.scatter_add_(1, group + 1, flags.int())
    return out[:, 1:] > 0


def _frame_starts(ids, real, template: Template, root, framed, video_grid_thw) -> torch.Tensor:
    """Where a Qwen2-VL-style video (one pair of ``t`` equal frame groups of placeholders) starts a new frame:
    the first placeholder of groups 1 .. t-1. Video pairs are matched to ``video_grid_thw`` rows in order."""
    out = torch.zeros_like(ids, dtype=torch.bool)
    is_video = torch.isin(ids, torch.tensor(template.video_token_ids)) & real
    videos = [(b, r) for b in range(ids.shape[0]) for r in root[b][is_video[b]].unique_consecutive().tolist()]
    if not videos:
        return out
    grid = None if video_grid_thw is None else _video_grid(video_grid_thw)
    if grid is None or grid.shape[0] < len(videos):
        b, r = videos[0 if grid is None else grid.shape[0]]
        pos = int(((root[b] == r) & is_video[b]).nonzero()[0])
        raise LayoutError(f"row {b}, position {pos}: per-frame video segments need the prompt's video_grid_thw "
                          f"(one row per video; got {0 if grid is None else grid.shape[0]} for {len(videos)} videos)")
    for (b, r), (t, _, _) in zip(videos, grid.tolist()):
        where = ((root[b] == r) & is_video[b]).nonzero().flatten()
        if framed is not None and bool(framed[b, where[0]]):
            continue  # its frames are pairs of their own already
        if t < 1 or where.numel() % t:
            raise LayoutError(f"row {b}, position {int(where[0])}: a video of {where.numel()} placeholders does not "
                              f"split into its grid's {t} frame groups")
        per = where.numel() // t
        out[b, where[per::per]] = True
    return out


def _video_grid(video_grid_thw) -> torch.Tensor:
    """The prompt's ``video_grid_thw`` as int64 ``[videos, 3]`` rows ``(t, h, w)``; LayoutError for anything else
    (a float grid would cut a video at fractional positions)."""
    try:
        grid = torch.as_tensor(video_grid_thw)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise LayoutError(f"video_grid_thw must be integer rows (t, h, w), got {type(video_grid_thw).__name__} "
                          f"({e})") from None
    if grid.dtype.is_floating_point or grid.dtype.is_complex or grid.dtype == torch.bool:
        raise LayoutError(f"video_grid_thw must hold integers (t, h, w), got dtype {grid.dtype}")
    if grid.numel() % 3:
        raise LayoutError(f"video_grid_thw must be rows (t, h, w), got shape {tuple(grid.shape)}")
    return grid.reshape(-1, 3).cpu().long()


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


def _check_delimiters(ids, opens, closes, is_img, template: Template, real, framed=None) -> None:
    """Raise LayoutError at the first malformed position of the first malformed row. ``framed``: tokens of video
    pairs that hold frame pairs, where the only nesting allowed is (``Template.nests_videos``)."""
    depth = torch.cumsum(opens.int() - closes.int(), dim=1)
    inside_before = torch.nn.functional.pad(depth, (1, 0))[:, :-1] > 0  # depth before token t
    stray_final = torch.isin(ids, torch.tensor(template.final_part_ids or (-1,))) & real & ~inside_before
    max_depth = 2 if template.nests_videos else 1
    bad = (depth < 0) | (depth > max_depth) | (is_img & ~inside_before) | stray_final
    misplaced = torch.zeros_like(bad)
    if framed is not None:  # in a video of frame pairs: placeholders only inside frames, frames hold video only
        is_video = torch.isin(ids, torch.tensor(template.video_token_ids)) & real
        level = depth + closes.int()  # the depth of the pair a token belongs to
        misplaced = (framed & is_img & (level == 1)) | ((level == 2) & is_img & ~is_video)
        bad |= misplaced
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
            if misplaced[row, p]:
                what = f"placeholder {tok} outside the frame pairs of its video, or an image's inside a frame pair"
            elif is_img[row, p]:
                what = f"image placeholder {tok} outside any image segment"
            elif stray_final[row, p]:
                what = f"final-part id {tok} outside any image segment"
            elif depth[row, p] > max_depth:
                what = f"nested open delimiter {tok} (an image is already open)"
            elif depth[row, p] < 0:
                what = f"close delimiter {tok} without an open one"
            else:
                what = f"close delimiter {tok} does not match the open delimiter of its segment"
            raise LayoutError(f"row {row}, position {p}: {what}")
        if last_bad[row]:
            p = int((opens[row].nonzero().flatten())[-1])
            raise LayoutError(f"row {row}, position {p}: open delimiter {int(ids[row, p])} is never closed")
