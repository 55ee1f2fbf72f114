"""The one cache type (blindsight.cache.BoundedCache): bounded in entries and bytes, least recently used out,
safe from many threads; and every cache of the library is one of them, reported and configurable."""

import threading

import pytest
import torch

import blindsight
from blindsight.cache import BoundedCache, cache_info, tensor_bytes, tensor_digest

_n = [0]


def cache(**kw) -> BoundedCache:
    _n[0] += 1
    return BoundedCache(f"test.cache{_n[0]}", **kw)


def test_entries_bound_evicts_least_recently_used():
    c = cache(max_entries=2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # a is now the most recent
    c.put("c", 3)
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3
    info = c.info()
    assert (info.entries, info.evictions) == (2, 1)


def test_bytes_bound_counts_tensors_and_drops_what_cannot_fit():
    c = cache(max_entries=100, max_bytes=4000)
    for i in range(10):
        c.put(i, (torch.zeros(250), {"x": [torch.zeros(0)]}))  # 1000 bytes each
        assert c.info().bytes <= 4000
    assert len(c) == 4 and c.info().bytes == 4000
    big = torch.zeros(2000)
    assert c.put("big", big) is big and c.get("big") is None  # over the bound alone: returned, not kept
    view = torch.zeros(100)
    assert tensor_bytes((view[:10], view[10:])) == 400  # one storage counted once


def test_set_limits_evicts_now_and_zero_turns_it_off():
    c = cache(max_entries=8)
    for i in range(8):
        c.put(i, i)
    c.set_limits(max_entries=3)
    assert len(c) == 3
    c.set_limits(max_entries=0)
    assert c.get_or_build("k", lambda: 5) == 5 and len(c) == 0
    with pytest.raises(ValueError, match="max_entries"):
        c.set_limits(max_entries=-1)


def test_get_or_build_from_threads_gives_one_value_per_key_and_never_raises():
    c = cache(max_entries=3)
    errors, seen = [], {}

    def work(t):
        try:
            for i in range(2000):
                key = (i * 7 + t) % 11
                value = c.get_or_build(key, lambda key=key: ("v", key))
                assert value == ("v", key)
                seen.setdefault(key, value)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(c) <= 3


def test_digest_is_the_content():
    a = torch.arange(10)
    assert tensor_digest(a) == tensor_digest(a.clone())
    assert tensor_digest(a) != tensor_digest(a.flip(0))
    assert tensor_digest(a) != tensor_digest(a.int())  # dtype is part of it
    assert tensor_digest(None) is None


def test_every_library_cache_is_registered_and_bounded():
    names = set(cache_info())
    for name in ("layout.prompts", "masks.block_tiles", "lowering.segment_plans", "lowering.causal_masks",
                 "lowering.decisions", "lowering.rates", "lowering.flex_kernels", "fx.short_prompts"):
        assert name in names
        assert cache_info()[name].max_entries > 0
    blindsight.set_cache_limits("lowering.decisions", max_entries=10)
    assert cache_info()["lowering.decisions"].max_entries == 10
    blindsight.set_cache_limits("lowering.decisions", max_entries=4096)
    with pytest.raises(KeyError, match="no cache named"):
        blindsight.set_cache_limits("nope", max_entries=1)
