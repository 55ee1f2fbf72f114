"""Pictures: the four category masks of a layout side by side (matplotlib, optional dependency)."""

from __future__ import annotations

from typing import Sequence

from .layout import Layout
from .masks import BaseMask, reference_mask
from .profile import Category


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("pictures need matplotlib: pip install 'blindsight[plot]'") from e
    return plt


def plot_category_masks(layout: Layout, path, categories: Sequence[Category] = tuple(Category), base: BaseMask | None = None):
    """Save one panel per category: black = attended (q rows, k columns), row 0 of the batch."""
    plt = _pyplot()
    masks = reference_mask(layout, categories, base)[0]
    fig, axes = plt.subplots(1, len(categories), figsize=(3.2 * len(categories), 3.4))
    for ax, cat, m in zip(axes, categories, masks):
        kept = m.float().mean().item()
        ax.imshow(~m.numpy(), cmap="gray", interpolation="nearest")
        ax.set_title(f"{Category.parse(cat).json_name}  ({100 * kept:.0f}% of pairs)", fontsize=9)
        ax.set_xlabel("key")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel("query")
    fig.suptitle(f"BlindSight masks, {layout.seq_len} tokens, {int(layout.num_images[0])} images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
