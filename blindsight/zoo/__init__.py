"""The shipped default: a small Qwen2-VL-architecture model trained on synthetic multi-image shape questions.

``MODEL_DIR`` holds its weights, config and processor (``from_pretrained`` loads both); see README.md here for
how it was trained and what it has learned.
"""

import os

from .processor import ShapesProcessor

MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes-qwen2vl")

__all__ = ["MODEL_DIR", "ShapesProcessor"]
