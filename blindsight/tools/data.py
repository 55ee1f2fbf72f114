"""Calibration prompts: a JSONL file run through the model's own processor, or synthetic multi-image prompts.

JSONL format, one prompt per line: ``{"images": ["a.png", ...], "text": "... <image> ... <image> ...",
"answer": "..."}`` (``answer`` optional; image paths relative to the file). Each ``<image>`` marker becomes
the model's own image marker; the number of markers must equal the number of images.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from ..hf import image_text
from ..template import Template

__all__ = ["synthetic_samples", "jsonl_records", "jsonl_samples", "open_images", "load_processor", "image_marker",
           "DataError", "IMAGE_MARKER"]

IMAGE_MARKER = "<image>"


class DataError(ValueError):
    """Prompt data is unreadable, malformed or unusable for the model; the message names the file and line."""


def _text_ids(config, n: int, g: torch.Generator) -> list[int]:
    t = Template.from_config(config)
    reserved = set(t.image_open_ids + t.image_close_ids + t.image_token_ids)
    vocab = config.get_text_config().vocab_size
    hi = min([vocab] + [i for i in reserved if i >= 16])
    ids = torch.randint(3, max(4, hi), (n,), generator=g).tolist()
    return [i for i in ids if i not in reserved] or [3]


def synthetic_samples(config, num_samples: int, *, seed: int = 0, min_images: int = 2, max_images: int = 6,
                      max_text: int = 24) -> list[dict]:
    """Random multi-image prompts (model inputs) for a qwen2_vl, qwen2_5_vl or gemma3 config: random image
    counts, sizes (Qwen) and text runs; random pixels. For smoke runs and tests, not for real calibration."""
    config = getattr(config, "config", config)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_samples):
        n = int(torch.randint(min_images, max_images + 1, (1,), generator=g))
        runs = [int(x) for x in torch.randint(1, max_text + 1, (n + 1,), generator=g)]
        out.append(_synthetic_prompt(config, n, runs, g))
    return out


def _synthetic_prompt(config, n_images: int, runs: list[int], g) -> dict:
    ids, types, pixels, grids = [], [], [], []
    mt = config.model_type
    for i, r in enumerate(runs):
        text = _text_ids(config, r, g)
        ids += text
        types += [0] * len(text)
        if i == n_images:
            break
        if mt in ("qwen2_vl", "qwen2_5_vl"):
            v = config.vision_config
            m = v.spatial_merge_size
            h, w = (m * int(x) for x in torch.randint(1, 5, (2,), generator=g))
            n_tok = h * w // (m * m)
            ids += [config.vision_start_token_id] + [config.image_token_id] * n_tok + [config.vision_end_token_id]
            types += [0] + [1] * n_tok + [0]
            dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
            pixels.append(torch.randn(h * w, dim, generator=g))
            grids.append([1, h, w])
        elif mt == "gemma3":
            n_tok = config.mm_tokens_per_image
            ids += [config.boi_token_index] + [config.image_token_index] * n_tok + [config.eoi_token_index]
            types += [0] + [1] * n_tok + [0]
            s = config.vision_config.image_size
            pixels.append(torch.randn(1, config.vision_config.num_channels, s, s, generator=g))
        else:
            raise DataError(f"synthetic prompts know qwen2_vl, qwen2_5_vl and gemma3, not {mt!r}")
    sample = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
              "pixel_values": torch.cat(pixels)}
    if mt == "gemma3":
        sample["token_type_ids"] = torch.tensor([types])
    else:
        sample["mm_token_type_ids"] = torch.tensor([types])
        sample["image_grid_thw"] = torch.tensor(grids)
    return sample


def _text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file; DataError names the file, and the line it cannot decode."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a JSONL file")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e.strerror}") from e
    with f:
        for lineno, raw in enumerate(f, 1):
            # decoded line by line, not by open(encoding=...), so that an error can name its line
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}, line {lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1})") from None


def jsonl_records(path: str | os.PathLike, require_answer: bool = False) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` of a JSONL prompt file, validated: images exist, markers match images (and,
    with ``require_answer``, a non-empty ``answer`` string)."""
    base = os.path.dirname(os.path.abspath(path))
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from e
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply to read") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise DataError(f"{where}: expected an object with a \"text\" string")
        if require_answer and not (isinstance(rec.get("answer"), str) and rec["answer"].strip()):
            raise DataError(f"{where}: an evaluation record needs a non-empty \"answer\" string")
        images = rec.get("images", [])
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise DataError(f"{where}: \"images\" must be a list of file paths")
        markers = rec["text"].count(IMAGE_MARKER)
        if markers != len(images):
            raise DataError(f"{where}: the text has {markers} {IMAGE_MARKER} markers but {len(images)} images")
        paths = [p if os.path.isabs(p) else os.path.join(base, p) for p in images]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DataError(f"{where}: image file not found: {missing[0]}")
        yield lineno, dict(rec, images=paths)


def image_marker(processor, model_type: str) -> str:
    """What the model's processor expects for one image in a prompt (each ``<image>`` becomes it); DataError if
    neither BlindSight nor the processor knows."""
    text = image_text(processor, model_type)
    if not text:
        raise DataError(f"no image marker known for model_type {model_type!r} and its processor has no image_token")
    return text


def open_images(paths: list[str], where: str) -> list:
    """The record's images as RGB PIL images; DataError naming ``where`` for one that cannot be read."""
    from PIL import Image

    images = []
    for p in paths:
        try:
            images.append(Image.open(p).convert("RGB"))
        except OSError as e:
            raise DataError(f"{where}: cannot read image {p}: {e}") from e
    return images


def load_processor(path: str | os.PathLike):
    """The processor saved with a model: BlindSight's word-level one for the shipped model, else AutoProcessor."""
    from ..zoo.processor import PROCESSOR_FILE, ShapesProcessor

    if os.path.isfile(os.path.join(path, PROCESSOR_FILE)):
        return ShapesProcessor.from_pretrained(path)
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except OSError as e:  # transformers' message for missing processor files runs over many lines
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot load the model's processor ({first})") from e


def jsonl_samples(path, processor, model_type: str, limit: int | None = None) -> Iterator[dict]:
    """Model inputs for each JSONL prompt, made by the model's own processor."""
    marker = image_marker(processor, model_type)
    for n, (lineno, rec) in enumerate(jsonl_records(path)):
        if limit is not None and n >= limit:
            return
        images = open_images(rec["images"], f"{path}, line {lineno}")
        text = rec["text"].replace(IMAGE_MARKER, marker)
        yield dict(processor(text=[text], images=images or None, return_tensors="pt"))
