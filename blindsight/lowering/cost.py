"""The cost model: does a sparse call beat the dense call it replaces, on this machine?

A sparse lowering pays for its skipped pairs with more, smaller kernel calls (and, on CPU, float masks on
the rows that keep different keys). On a short prompt that costs more than it saves, so before a call runs
sparse, :func:`sparse_pays` compares two predictions in seconds, built from the same measured rates:

- the dense call: the pairs its kernel computes at the dense kernel's rate;
- the sparse call: the lowering's own account of its work (:class:`Work`: pairs on the dense kernel, pairs
  on small masked calls, number of calls), at the rates measured for each.

The rates (:class:`KernelRates`) are measured once per process, lowering, device, dtype and head size, at the
first call that needs them, by timing a few kernel calls and the lowering itself on a small prompt (tens of
milliseconds on CPU); nothing is a constant tuned on one machine. A call predicted not to gain runs dense
(exact anyway) and is counted as
``fallback.not_faster``. ``BackendOptions(only_if_faster=False)`` skips the check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..cache import BoundedCache

__all__ = ["Work", "KernelRates", "kernel_rates", "predicted_seconds", "sparse_pays", "clear_rates", "best_seconds"]


@dataclass(frozen=True)
class Work:
    """What a call computes: pairs on one large causal kernel call, pairs on small (masked) calls, calls."""

    dense_pairs: float = 0.0
    small_pairs: float = 0.0
    calls: int = 0

    def __add__(self, other: Work) -> Work:
        return Work(self.dense_pairs + other.dense_pairs, self.small_pairs + other.small_pairs,
                    self.calls + other.calls)


@dataclass(frozen=True)
class KernelRates:
    """Measured seconds per (query, key) pair on each kind of call, and per call."""

    dense_pair_s: float
    small_pair_s: float
    call_s: float


def predicted_seconds(work: Work, rates: KernelRates) -> float:
    return work.dense_pairs * rates.dense_pair_s + work.small_pairs * rates.small_pair_s + work.calls * rates.call_s


# (lowering, device type, dtype, head size, threads) -> KernelRates: a handful per process
_RATES = BoundedCache("lowering.rates", max_entries=64)


def clear_rates() -> None:
    """Forget the measured rates (they are measured again at the next call that needs them)."""
    _RATES.clear()


def best_seconds(fn, device: torch.device, repeat: int = 7, warmup: int = 2) -> float:
    """The fastest of ``repeat`` timed runs of ``fn()`` after ``warmup``: other work on the machine only ever
    adds time, so the minimum is the kernel's own cost (a median drifts with the machine's load)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def kernel_rates(lowering: str, device: torch.device, dtype: torch.dtype, head_dim: int, measure) -> KernelRates:
    """This machine's rates for (lowering, device, dtype, head size): ``measure(dtype, head_dim)`` at the first
    use, then remembered."""
    key = (lowering, device.type, dtype, head_dim, torch.get_num_threads())

    def build():
        with torch.no_grad():
            return measure(dtype, head_dim)
    return _RATES.get_or_build(key, build)


def sparse_pays(sparse: Work, dense: Work, rates: KernelRates) -> bool:
    """Is the sparse call predicted to be faster than the dense one?"""
    return predicted_seconds(sparse, rates) < predicted_seconds(dense, rates)
