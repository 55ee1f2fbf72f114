"""Synthetic multi-image question answering: shapes drawn on small images, questions whose answers need several.

Every image holds one shape (circle, square, triangle or cross) of one colour at a random place and size. A
prompt shows 2-8 images, each followed by a text label (``<image> image 3 :``), then one question; every answer is one
word:
- ``find``: "which image shows a red circle ?" -> the only image holding that colour and shape ("1".."8");
- ``count``: "how many images show red shapes ?" / "how many images show a circle ?" -> "0".."8";
- ``same``: "do image 2 and 5 match ?" -> "yes" when both hold the same colour and shape (place and size differ);
- ``color`` / ``shape``: "what color is in image 3 ?" -> the colour (or shape) of that image.
All questions are six words long, so prompts with the same number of images have the same length.

Records are what ``blindsight eval`` reads (``images``, ``text`` with ``<image>`` markers, ``answer``), with the
images as PIL images in memory (``write_jsonl`` saves them as PNG files). Everything is drawn from a
``numpy`` generator seeded per split: the same seed gives the same records.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["COLORS", "SHAPES", "TASKS", "SPLITS", "IMAGE_SIZE", "render", "make_record", "make_records",
           "write_jsonl", "vocabulary", "prompt_text"]

IMAGE_SIZE = 96
COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
          "purple": (160, 60, 200), "cyan": (40, 210, 220)}
SHAPES = ("circle", "square", "triangle", "cross")
TASKS = ("find", "count", "same", "color", "shape")
# fixed seeds: the training, calibration, benchmark and held-out prompts never overlap in how they are drawn
# (holdout: what `blindsight tune` scores its candidates on, apart from the benchmark that reports the result)
SPLITS = {"train": 1, "calibration": 2, "benchmark": 3, "holdout": 4}
IMAGE_MARKER = "<image>"


def render(color: str, shape: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """One shape of ``color`` at a random place and size on a dark, slightly noisy background."""
    bg = rng.integers(0, 40, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    r = int(rng.integers(size // 4, size // 3 + 1))  # half-width of the shape
    cx, cy = (int(v) for v in rng.integers(r + 2, size - r - 2, size=2))
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        w = max(2, r // 3)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return img


def _question(task: str, items: list[tuple[str, str]],
              rng: np.random.Generator) -> tuple[list[tuple[str, str]], str, str]:
    """(possibly adjusted items, question, answer) for one task over the images' (colour, shape) items."""
    n = len(items)
    colors, shapes = list(COLORS), list(SHAPES)
    if task == "find":
        target = (colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))])
        where = int(rng.integers(n))
        items = [it if it != target else _other(target, rng) for it in items]
        items[where] = target
        return items, f"which image shows a {target[0]} {target[1]} ?", str(where + 1)
    if task == "count":
        if rng.random() < 0.5:
            c = colors[rng.integers(len(colors))]
            k = int(rng.integers(0, n + 1))  # the count is uniform over 0..n, not skewed to small numbers
            chosen = set(rng.choice(n, size=k, replace=False).tolist())
            items = [(c, s) if i in chosen else (_other_color(c, rng), s) for i, (_, s) in enumerate(items)]
            return items, f"how many images show {c} shapes ?", str(k)
        s = shapes[rng.integers(len(shapes))]
        k = int(rng.integers(0, n + 1))
        chosen = set(rng.choice(n, size=k, replace=False).tolist())
        items = [(c, s) if i in chosen else (c, _other_shape(s, rng)) for i, (c, _) in enumerate(items)]
        return items, f"how many images show a {s} ?", str(k)
    if task == "same":
        i, j = (int(x) for x in rng.choice(n, size=2, replace=False))
        if rng.random() < 0.5:
            items[j] = items[i]
        elif items[j] == items[i]:
            items[j] = _other(items[i], rng)
        return items, f"do image {i + 1} and {j + 1} match ?", "yes" if items[i] == items[j] else "no"
    if task in ("color", "shape"):
        i = int(rng.integers(n))
        return items, f"what {task} is in image {i + 1} ?", items[i][0 if task == "color" else 1]
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")


def _other_color(c, rng):
    rest = [x for x in COLORS if x != c]
    return rest[rng.integers(len(rest))]


def _other_shape(s, rng):
    rest = [x for x in SHAPES if x != s]
    return rest[rng.integers(len(rest))]


def _other(item, rng):
    return (_other_color(item[0], rng), item[1]) if rng.random() < 0.5 else (item[0], _other_shape(item[1], rng))


def _draw_task(rng: np.random.Generator, task_weights=None) -> str:
    """A task, uniform over :data:`TASKS` (the held-out splits) or with ``task_weights`` (one per task, for
    training)."""
    if task_weights is None:
        return TASKS[rng.integers(len(TASKS))]
    return TASKS[rng.choice(len(TASKS), p=np.asarray(task_weights, dtype=float) / np.sum(task_weights))]


def follow_up_questions(items: list[tuple[str, str]], rng: np.random.Generator, num: int,
                        task_weights=None) -> list[tuple[str, str]]:
    """``num`` more (question, answer) pairs about the same images, answered from ``items`` as drawn (for
    training with several questions per prompt: more supervision per forward pass)."""
    n, out = len(items), []
    for _ in range(num):
        task = _draw_task(rng, task_weights)
        if task == "find":
            unique = [i for i, it in enumerate(items) if items.count(it) == 1]
            if unique:
                i = unique[rng.integers(len(unique))]
                out.append((f"which image shows a {items[i][0]} {items[i][1]} ?", str(i + 1)))
                continue
            task = "color"
        if task == "count":
            if rng.random() < 0.5:
                c = list(COLORS)[rng.integers(len(COLORS))]
                out.append((f"how many images show {c} shapes ?", str(sum(x == c for x, _ in items))))
            else:
                sh = SHAPES[rng.integers(len(SHAPES))]
                out.append((f"how many images show a {sh} ?", str(sum(x == sh for _, x in items))))
        elif task == "same":
            i, j = (int(x) for x in rng.choice(n, size=2, replace=False))
            out.append((f"do image {i + 1} and {j + 1} match ?", "yes" if items[i] == items[j] else "no"))
        else:
            i = int(rng.integers(n))
            out.append((f"what {task} is in image {i + 1} ?", items[i][0 if task == "color" else 1]))
    return out


def prompt_text(num_images: int, question: str) -> str:
    """``<image> image 1 : <image> image 2 : ... question : ... answer :``

    The label follows its image. Why: a label token then sees its image's tokens (causal attention) and can carry
    what the image shows next to its own number, so "which image shows ..." is one content look-up among the
    label tokens that returns a number token. With the label before the image (the previous format) the number
    had to be bound into 36 image tokens of norm ~27 whose values the answer row then read; the models trained
    that way never learned the look-up (the previous shipped model: ``find`` at chance on 2-8 images)."""
    labels = " ".join(f"{IMAGE_MARKER} image {i + 1} :" for i in range(num_images))
    return f"{labels} question : {question} answer :"


def make_record(rng: np.random.Generator, num_images: int, task: str | None = None, task_weights=None) -> dict:
    """One prompt: ``{"images": [PIL images], "text", "answer", "task", "items": [(colour, shape) per image]}``;
    the task is ``task``, else drawn (:func:`_draw_task`)."""
    task = task or _draw_task(rng, task_weights)
    colors, shapes = list(COLORS), list(SHAPES)
    items = [(colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))]) for _ in range(num_images)]
    items, question, answer = _question(task, items, rng)
    images = [render(c, s, rng) for c, s in items]
    return {"images": images, "text": prompt_text(num_images, question), "answer": answer, "task": task,
            "items": items}


def make_records(split: str, num: int, *, min_images: int = 2, max_images: int = 8,
                 seed: int | None = None) -> list[dict]:
    """``num`` records of a split (its own fixed seed unless ``seed`` is given), 2-8 images each by default."""
    if split not in SPLITS and seed is None:
        raise ValueError(f"unknown split {split!r}; known: {sorted(SPLITS)} (or pass seed=)")
    if not 2 <= min_images <= max_images <= 9:
        raise ValueError(f"need 2 <= min_images <= max_images <= 9 (one-digit answers), got {min_images}, {max_images}")
    rng = np.random.default_rng(SPLITS[split] if seed is None else seed)
    return [make_record(rng, int(rng.integers(min_images, max_images + 1))) for _ in range(num)]


def write_jsonl(records: list[dict], path: str | os.PathLike) -> str:
    """Save records as a JSONL file with PNG images next to it (the format ``blindsight eval`` reads)."""
    path = os.fspath(path)
    folder = os.path.splitext(path)[0] + "-images"
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        for n, rec in enumerate(records):
            names = []
            for i, img in enumerate(rec["images"]):
                name = os.path.join(os.path.basename(folder), f"{n:05d}-{i}.png")
                img.save(os.path.join(os.path.dirname(os.path.abspath(path)), name))
                names.append(name)
            line = {"images": names, "text": rec["text"], "answer": rec["answer"], "task": rec["task"]}
            f.write(json.dumps(line) + "\n")
    return path


def vocabulary() -> list[str]:
    """Every word a prompt or answer can hold."""
    words = ["image", ":", "question", "answer", "?", "which", "shows", "a", "how", "many", "images", "show",
             "shapes", "do", "and", "match", "what", "color", "shape", "is", "in", "yes", "no"]
    words += [str(i) for i in range(10)] + list(COLORS) + list(SHAPES)
    return words


def main(argv=None) -> int:
    """``python -m blindsight.zoo.shapes --split benchmark --num 200 --images 8 --out bench.jsonl``"""
    import argparse

    p = argparse.ArgumentParser(description="write a split of the shapes tasks as JSONL + PNG images")
    p.add_argument("--split", default="benchmark", choices=sorted(SPLITS))
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--images", default="8", help="images per prompt: N, or MIN-MAX")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    lo, _, hi = args.images.partition("-")
    path = write_jsonl(make_records(args.split, args.num, min_images=int(lo), max_images=int(hi or lo)), args.out)
    print(f"{args.num} prompts written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
