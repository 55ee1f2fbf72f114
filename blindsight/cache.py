"""Bounded, thread-safe caches: the one kind of cache the library keeps (DESIGN §11).

Everything BlindSight remembers between calls (a prompt's layout, a layout's plan and block masks, cost-model
decisions, measured kernel rates, compiled kernels) lives in a :class:`BoundedCache`: least recently used
entries are evicted once the cache holds more than ``max_entries`` entries or more than ``max_bytes`` bytes of
tensors, so a server that sees a new prompt layout at every request keeps a bounded amount of memory. Each
cache has a name; :func:`cache_info` reports them all, :func:`set_cache_limits` changes one's bounds and
:func:`clear_caches` empties them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

__all__ = ["BoundedCache", "CacheInfo", "cache_info", "set_cache_limits", "clear_caches", "tensor_bytes",
           "tensor_digest"]

_REGISTRY: dict[str, BoundedCache] = {}
_REGISTRY_LOCK = threading.Lock()


@dataclass(frozen=True)
class CacheInfo:
    """One cache's bounds, what it holds now, and its hits, misses and evictions since the process started."""

    name: str
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int | None
    hits: int
    misses: int
    evictions: int


def tensor_bytes(value, _seen=None) -> int:
    """Bytes of the tensors reachable from ``value`` through tuples, lists, dicts and dataclasses (each storage
    once): what an entry holds beyond a few Python objects."""
    seen = _seen if _seen is not None else set()
    if isinstance(value, torch.Tensor):
        ptr = (value.untyped_storage().data_ptr(), value.device) if value.layout == torch.strided else id(value)
        if ptr in seen:
            return 0
        seen.add(ptr)
        return value.untyped_storage().nbytes() if value.layout == torch.strided else 0
    if isinstance(value, dict):
        return sum(tensor_bytes(k, seen) + tensor_bytes(v, seen) for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v, seen) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(tensor_bytes(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    return 0


def tensor_digest(t: torch.Tensor | None) -> tuple | None:
    """A hashable stand-in for a tensor's content (shape, dtype, device and a 128-bit hash of its bytes)."""
    if t is None:
        return None
    data = t.detach().contiguous().cpu()
    return (tuple(t.shape), str(t.dtype), str(t.device),
            hashlib.blake2b(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"",
                            digest_size=16).hexdigest())


class BoundedCache:
    """A least-recently-used map bounded in entries and in tensor bytes, safe to share between threads.

    ``get_or_build(key, build)`` builds outside the lock (a slow build does not block other keys; two threads
    that miss on one key may both build it, and the first stored wins, so every caller gets one value). An
    entry larger than ``max_bytes`` on its own is returned but not kept. ``size`` gives an entry's bytes
    (default :func:`tensor_bytes`).
    """

    def __init__(self, name: str, max_entries: int, max_bytes: int | None = None,
                 size: Callable[[object], int] = tensor_bytes):
        _check_limits(name, max_entries, max_bytes)
        self.name, self.max_entries, self.max_bytes, self._size = name, max_entries, max_bytes, size
        self._entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()
        with _REGISTRY_LOCK:
            if name in _REGISTRY:
                raise ValueError(f"a cache named {name!r} exists already")
            _REGISTRY[name] = self

    def get(self, key: Hashable, default=None):
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                self._misses += 1
                return default
            self._entries.move_to_end(key)
            self._hits += 1
            return hit[0]

    def put(self, key: Hashable, value) -> object:
        """Store ``value`` under ``key`` unless the key is there already; returns the value stored under it."""
        nbytes = self._size(value)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit[0]
            if self.max_bytes is not None and nbytes > self.max_bytes:
                return value
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            self._evict()
            return value

    def get_or_build(self, key: Hashable, build: Callable[[], object]):
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                return hit[0]
            self._misses += 1
        return self.put(key, build())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def set_limits(self, max_entries: int | None = None, max_bytes: int | None = None) -> None:
        """New bounds (``None`` keeps one as it is); entries over them are evicted now."""
        max_entries = self.max_entries if max_entries is None else max_entries
        max_bytes = self.max_bytes if max_bytes is None else max_bytes
        _check_limits(self.name, max_entries, max_bytes)
        with self._lock:
            self.max_entries, self.max_bytes = max_entries, max_bytes
            self._evict()

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self.name, len(self._entries), self._bytes, self.max_entries, self.max_bytes,
                             self._hits, self._misses, self._evictions)

    def _evict(self) -> None:  # under the lock
        while self._entries and (len(self._entries) > self.max_entries
                                 or self.max_bytes is not None and self._bytes > self.max_bytes):
            _, (_, nbytes) = self._entries.popitem(last=False)
            self._bytes -= nbytes
            self._evictions += 1


def _check_limits(name: str, max_entries, max_bytes) -> None:
    if type(max_entries) is not int or max_entries < 0:
        raise ValueError(f"cache {name!r}: max_entries must be an int >= 0, got {max_entries!r}")
    if max_bytes is not None and (type(max_bytes) is not int or max_bytes < 0):
        raise ValueError(f"cache {name!r}: max_bytes must be an int >= 0 or None, got {max_bytes!r}")


def cache_info() -> dict[str, CacheInfo]:
    """Every cache's :class:`CacheInfo`, by name."""
    with _REGISTRY_LOCK:
        caches = list(_REGISTRY.values())
    return {c.name: c.info() for c in caches}


def set_cache_limits(name: str, max_entries: int | None = None, max_bytes: int | None = None) -> None:
    """Change the bounds of the cache ``name`` (see :func:`cache_info` for the names); 0 entries turns it off."""
    with _REGISTRY_LOCK:
        cache = _REGISTRY.get(name)
    if cache is None:
        raise KeyError(f"no cache named {name!r}; the caches are {sorted(_REGISTRY)}")
    cache.set_limits(max_entries, max_bytes)


def clear_caches() -> None:
    """Empty every cache (the measured kernel rates too: they are measured again at the next call)."""
    with _REGISTRY_LOCK:
        caches = list(_REGISTRY.values())
    for c in caches:
        c.clear()
