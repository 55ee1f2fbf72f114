"""Progress bars and warm timings of long runs (calibration, evaluation, tuning, the demo and the benchmarks).

tqdm is imported only when a bar is shown.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator

__all__ = ["progress_bar", "steps", "StatusBar", "median_time", "alternating_medians"]


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


class StatusBar:
    """A bar of an unknown number of steps whose description and status text change as it goes (the tuner's:
    which candidate runs, and the best so far); does nothing when not ``enabled``."""

    def __init__(self, enabled: bool, desc: str, unit: str = "it"):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc=desc, unit=unit)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show(self, desc: str | None = None, status: str | None = None) -> None:
        if self.bar is not None:
            if desc is not None:
                self.bar.set_description_str(desc, refresh=False)
            if status is not None:
                self.bar.set_postfix_str(status, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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


def alternating_medians(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Seconds of one warm call of each of ``fns``, timed in turn: ``rounds`` rounds of one call of each (the order
    rotating from round to round), after ``warmup`` untimed calls of each; the medians. A machine whose speed drifts
    over a measurement (up to ~30% on small shared ones) then slows every function alike, so their ratios hold
    where medians taken one function after the other would not."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t) for name, t in times.items()}
