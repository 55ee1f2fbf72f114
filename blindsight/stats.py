"""Process-wide counters: what BlindSight found, rewrote, built and skipped (``blindsight.stats()``)."""

from __future__ import annotations

from collections import Counter

_COUNTS: Counter = Counter()


def count(name: str, n: int = 1) -> None:
    _COUNTS[name] += n


def stats() -> dict[str, int]:
    """A snapshot of the counters (names like ``block_masks_built``, ``fallback.<reason>``)."""
    return dict(sorted(_COUNTS.items()))


def reset_stats() -> None:
    _COUNTS.clear()
