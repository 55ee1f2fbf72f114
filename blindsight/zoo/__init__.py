"""The shipped default: a small Qwen2-VL-architecture model trained on synthetic multi-image shape questions."""

from .processor import ShapesProcessor

__all__ = ["ShapesProcessor"]
