"""Progress bars and warm timings of long runs (calibration, evaluation, the demo and the benchmarks).

tqdm is imported only when a bar is shown.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator

__all__ = ["progress_bar", "steps", "median_time"]


def progress_bar(items: Iterable, enabled: bool, desc: str, unit: str = "it") -> Iterable:
    """``items`` with a tqdm bar when ``enabled``, else ``items`` itself."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit)


def steps(enabled: bool, total: int, desc: str) -> Iterator[None]:
    """A bar of ``total`` steps advanced by ``next()`` (a bar-less endless iterator when not ``enabled``)."""
    if enabled:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="step")
        for _ in range(total):
            yield bar.update(1)
        bar.close()
    else:
        while True:
            yield None


def median_time(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """Seconds of one warm call of ``fn``: the median of ``repeat`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
