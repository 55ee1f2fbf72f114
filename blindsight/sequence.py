"""The token ids of the whole sequence an attention call belongs to, for calls whose queries are at an offset.

A forward given a KV cache (a second chat turn, a cached prefix, a prefill chunk) sees only its new tokens'
ids, but its attention covers the keys of every earlier token, and the categories need the layout of all of
them (DESIGN §2, "Queries at an offset"). The earlier ids come from, in order:

1. a running model call whose ``input_ids`` hold the whole sequence: ``generate`` keeps every token so far (the
   prompt of each turn, the tokens it generated) in its loop's ``input_ids``, and hands the model only the
   uncached ones;
2. the ids BlindSight saw go into that cache object: every prefill forward with a cache (a ``DynamicCache``, or
   any object with transformers' ``Cache`` methods) records the sequence so far on the cache object itself: it
   lives and dies with the cache, and ``copy.deepcopy`` of a cache (how prefix caching reuses one) copies it.
   A later forward continues the record (the record, then its own ids; its later layers get the same);
   ``crop``, ``reorder_cache``, ``reset``, ``batch_select_indices`` and ``batch_repeat_interleave`` on the
   cache drop it. Tokens fed one at a time (decode steps outside ``generate``) are not recorded: the next
   forward's key length then exceeds the record and it runs dense. A cache changed other than through its
   methods (its tensors edited in place) is not supported;
3. nothing: the call runs dense, counted as ``fallback.unknown_prefix``, never with a guessed layout.

A :func:`blindsight.use_layout` block with the layout of the whole sequence comes before all of these.
"""

from __future__ import annotations

import functools
import os
import sys
import types
import weakref
from dataclasses import dataclass

import torch

__all__ = ["RunningPrompt", "running_model_calls", "running_prompts", "sequence_ids", "remember", "forget"]

_INTERNAL_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)
_INVALIDATING = ("crop", "reorder_cache", "reset", "batch_select_indices", "batch_repeat_interleave")


@dataclass(frozen=True)
class RunningPrompt:
    """One running model call that has ``input_ids``: its ids, its 2-D attention mask (if any) and its cache."""

    ids: torch.Tensor
    mask: torch.Tensor | None
    cache: object | None


def running_model_calls(max_frames: int = 200):
    """For each running model call, innermost first, a function ``arg(name)`` that reads its argument ``name``.

    Walks up the Python stack (skipping torch's and BlindSight's own frames) through the frames of ``nn.Module``
    methods, and stops at the first frame that is not one (the caller's own code). Every frame it looks at is
    still running, so what it reads belongs to the forward in progress or to a call around it (``generate``).
    transformers' forward decorators (``wrapper(self, *args, **kwargs)``) hold a call's arguments in ``kwargs``:
    under torch.compile the forward's own frame is compiled away and only theirs runs, so those are read too.
    """
    f = sys._getframe(1)
    for _ in range(max_frames):
        if f is None:
            break
        if not f.f_code.co_filename.startswith(_INTERNAL_DIRS):
            local = f.f_locals
            if not isinstance(local.get("self"), torch.nn.Module):
                break
            kwargs = local.get("kwargs")
            kwargs = kwargs if isinstance(kwargs, dict) else {}
            yield lambda name, local=local, kwargs=kwargs: local.get(name, kwargs.get(name))
        f = f.f_back


def running_prompts(max_frames: int = 200) -> list[RunningPrompt]:
    """The running model calls (:func:`running_model_calls`) that have 2-D integer ``input_ids``, innermost first."""
    out = []
    for arg in running_model_calls(max_frames):
        ids = arg("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
            mask = arg("attention_mask")
            mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            cache = arg("past_key_values")
            out.append(RunningPrompt(ids, mask, cache if _is_cache(cache) else None))
    return out


def _is_cache(obj) -> bool:
    return obj is not None and hasattr(obj, "get_seq_length") and hasattr(obj, "update")


_RECORD = "_blindsight_sequence"  # on the cache object: (ids [B, n], mask [B, n] | None, weakref to the writer's ids)


def forget(cache) -> None:
    """Drop what was recorded with ``cache``."""
    cache.__dict__.pop(_RECORD, None)


def _watch(cache) -> None:
    """Make the cache's reordering and cropping methods drop its record (once per cache object). They are bound
    methods of the cache, so ``copy.deepcopy`` of the cache (prefix caching) binds them to the copy, which also
    gets a copy of the record: it holds the same tokens."""
    if cache.__dict__.get("_blindsight_watched"):
        return
    for name in _INVALIDATING:
        if callable(getattr(type(cache), name, None)):
            setattr(cache, name, types.MethodType(_method(name), cache))
    cache._blindsight_watched = True


@functools.cache
def _method(name: str):
    def dropping(self, *args, **kwargs):
        forget(self)
        return getattr(type(self), name)(self, *args, **kwargs)
    dropping.__name__ = name
    return dropping


def remember(cache, ids: torch.Tensor, mask: torch.Tensor | None, forward_ids: torch.Tensor) -> None:
    """Record ``ids`` (and their 2-D mask) as the sequence so far of ``cache``, written by the forward whose own
    ``input_ids`` are ``forward_ids`` (its later layers ask again: they get the same sequence)."""
    if cache is None or not hasattr(cache, "__dict__"):
        return
    old = cache.__dict__.get(_RECORD)
    if old is not None and old[2]() is forward_ids:
        return  # every layer of a forward records the same sequence
    # copies: a caller may reuse its buffers for the next request
    cache.__dict__[_RECORD] = (ids.detach().clone(), None if mask is None else mask.detach().clone(),
                               weakref.ref(forward_ids))
    _watch(cache)


def _holds(cache, total: int, new: int) -> bool:
    """Does the cache's first full-attention layer hold ``total - new`` tokens (before this forward wrote to it) or
    ``total`` (after)? A record that misses tokens (fed one at a time) fails this; a cache of sliding layers only
    cannot tell (True)."""
    try:
        sliding = list(getattr(cache, "is_sliding", None) or [])
        layer = next((i for i, s in enumerate(sliding) if not s), None)
        if layer is None:
            return True
        return cache.get_seq_length(layer) in (total - new, total)
    except Exception:  # another cache class: nothing to compare with
        return True


def sequence_ids(prompts: list[RunningPrompt]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(ids, 2-D mask or None)`` of the whole sequence that the innermost running call continues (its earlier
    tokens, then its own), or None when the earlier tokens are unknown. Recorded with that call's cache."""
    if not prompts:
        return None
    inner = prompts[0]
    B, L = inner.ids.shape
    found = None
    for p in prompts[1:]:  # a call around it that holds the whole sequence (generate's loop)
        if p.ids.shape[0] == B and p.ids.shape[1] > L and torch.equal(p.ids[:, -L:].to(inner.ids.device), inner.ids):
            found = p.ids
            break
    mask = None
    if found is None and inner.cache is not None:
        hit = getattr(inner.cache, "__dict__", {}).get(_RECORD)
        if hit is not None and hit[0].shape[0] == B:
            ids, earlier_mask, writer = hit
            if writer() is inner.ids:  # a later layer of the forward that recorded it
                return ids, earlier_mask
            found = torch.cat([ids.to(inner.ids.device), inner.ids], 1)
            if not _holds(inner.cache, found.shape[1], L):
                return None
            if earlier_mask is not None:
                own = inner.mask[:, -L:] if inner.mask is not None and inner.mask.shape[0] == B and \
                    inner.mask.shape[1] >= L else torch.ones_like(inner.ids)
                mask = torch.cat([earlier_mask.to(own.device), own.to(earlier_mask.dtype)], 1)
    if found is None:
        return None
    T = found.shape[1]
    if mask is None:  # the forward's own 2-D mask covers the whole sequence when a cache is used
        mask = next((p.mask for p in prompts if p.mask is not None and tuple(p.mask.shape) == (B, T)), None)
    remember(inner.cache, found, mask, inner.ids)
    return found, mask
