"""Pictures: the four category masks of a layout side by side (matplotlib, optional dependency)."""

from __future__ import annotations

from collections.abc import Sequence

from ..categories import Category
from ..layout import Layout
from ..masks import BaseMask, reference_mask


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("pictures need matplotlib: pip install 'blindsight[plot]'") from e
    return plt


def plot_category_masks(layout: Layout, path, categories: Sequence[Category] = tuple(Category),
                        base: BaseMask | None = None):
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


def plot_profile(profile, path) -> None:
    """Heatmaps, layers x heads: the categories, and (when calibrated) the aggregated recall per category."""
    import numpy as np
    from matplotlib.colors import ListedColormap

    plt = _pyplot()
    cats = np.array([[int(c) for c in layer] for layer in profile.categories])
    panels = [("categories", cats)]
    if profile.scores:
        panels += [(f"recall {c}", profile.recall(c).numpy()) for c in ("sink", "intra", "intra_sink")]
    L, H = cats.shape
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 0.35 * H * len(panels) + 1.2 * len(panels), 1.5 + 0.25 * L),
                             squeeze=False)
    colors = ListedColormap(["#444444", "#e69f00", "#56b4e9", "#009e73"])
    for ax, (title, data) in zip(axes[0], panels):
        if title == "categories":
            im = ax.imshow(data, cmap=colors, vmin=-0.5, vmax=3.5, aspect="auto", interpolation="nearest")
            cb = fig.colorbar(im, ax=ax, ticks=range(4))
            cb.ax.set_yticklabels([c.json_name for c in Category])
        else:
            im = ax.imshow(data, cmap="viridis", vmin=min(0.5, float(np.nanmin(data))), vmax=1.0, aspect="auto",
                           interpolation="nearest")
            fig.colorbar(im, ax=ax)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    fig.suptitle(f"BlindSight profile: {profile.model.model_type}, {L} layers x {H} heads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(points: list[dict], path, cross: int | None = None) -> None:
    """Speedup of one layer's attention (forced sparse, and with the cost model's defaults) and the ideal
    (FLOP ratio) against prompt length, log-scale length; ``cross``: the length where sparse starts to win."""
    plt = _pyplot()
    tokens = [p["tokens"] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(tokens, [p["ideal"] for p in points], "k--", label="ideal (FLOP ratio)")
    ax.plot(tokens, [p["speedup"] for p in points], "o-", label="BlindSight, every call sparse")
    ax.plot(tokens, [p["default_speedup"] for p in points], "s:", label="BlindSight defaults (cost model)")
    ax.axhline(1.0, color="gray", lw=0.8)
    if cross is not None:
        ax.axvline(cross, color="tab:green", lw=0.8)
        ax.annotate(f"sparse wins from {cross} tokens", (cross, 1.0), xytext=(4, 6), textcoords="offset points",
                    fontsize=8, color="tab:green")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("speedup vs compiled dense SDPA")
    p0 = points[0]
    ax.set_title(f"one layer's attention: {p0['heads']} heads / {p0['kv_heads']} kv, d={p0['head_dim']}, {p0['dtype']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



def plot_frontier(result, path) -> None:
    """Held-out accuracy against attention FLOPs cut of every candidate ``blindsight tune`` tried (a
    :class:`~blindsight.tune.TuneResult`): the dense model, the given profile, the budget line, the chosen point
    marked; a candidate whose evaluation stopped early is drawn at the most it could have reached."""
    from ..tune import points

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense, budget = 100 * result.dense_accuracy, result.config.budget
    ax.axhline(dense - budget, color="gray", ls="--", lw=0.8, label=f"dense - budget ({points(budget)})")
    ax.plot([0], [dense], "ks", label=f"dense ({dense:.1f}%)")
    groups = {"within budget": ("o", "tab:green", []), "over budget": ("o", "tab:red", []),
              "stopped early (at most)": ("v", "tab:red", [])}
    for t in result.trials:
        key = "within budget" if t.feasible else ("over budget" if t.complete else "stopped early (at most)")
        groups[key][2].append((100 * t.attention_flop_reduction, 100 * t.accuracy_bound))
    for label, (marker, color, xy) in groups.items():
        if xy:
            ax.plot(*zip(*xy), marker, color=color, ls="none", alpha=0.8, label=label)
    if result.given is not None:
        g = result.given
        ax.plot([100 * g.attention_flop_reduction], [100 * g.accuracy_bound], "D", mfc="none", mec="tab:blue", ms=10,
                label="given profile (fixed thresholds)")
    c = result.chosen
    x, y = (0.0, dense) if c is None else (100 * c.attention_flop_reduction, 100 * c.accuracy)
    ax.plot([x], [y], "*", color="gold", mec="black", ms=16, label="chosen")
    ax.set_xlabel("attention FLOPs cut on the held-out prompts (%)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"blindsight tune: {len(result.trials)} candidates on {result.holdout_size} held-out prompts",
                 fontsize=9)
    ax.margins(y=0.15)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
