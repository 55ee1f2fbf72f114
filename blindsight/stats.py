"""Process-wide counters: what BlindSight found, rewrote, built and skipped (``blindsight.stats()``).

Every language-model attention call that runs dense is counted as ``fallback.<reason>``. Reasons that are
normal operation (``decode``, ``no_images``: exactly dense by definition; ``not_faster``: predicted no faster
than dense) are only counted; every other reason
also warns once per process, the first time it happens, saying what to do (``warn_on_fallback`` warns always).
"""

from __future__ import annotations

import threading
import warnings
from collections import Counter

__all__ = ["count", "record_fallback", "stats", "reset_stats", "sparse_fraction", "FALLBACK_ADVICE"]

_COUNTS: Counter = Counter()
_LOCK = threading.Lock()
_WARNED: set = set()

# Fallbacks that are expected (the call is exactly dense by definition): never warned.
# ``not_faster``: the cost model predicted that sparse would not beat dense here (a short prompt): by design.
QUIET_FALLBACKS = frozenset({"decode", "no_images", "not_self_attention", "not_faster"})

FALLBACK_ADVICE = {
    "no_layout": "no input_ids reached this call's forward; pass input_ids, or wrap the call in "
                 "blindsight.use_layout(Layout.from_input_ids(...))",
    "layout_mismatch": "the layout's batch size or length differs from the attention call's",
    "unknown_prefix": "a forward continuing a KV cache whose earlier tokens BlindSight did not see (a cache built "
                      "elsewhere, cropped or reordered); wrap the call in blindsight.use_layout(layout of the whole "
                      "sequence), or build the cache through this model (generate, or forwards with this cache)",
    "no_layer": "a graph compiled from one decoder layer ran outside that layer's forward, so its categories "
                "are unknown; please report the model",
    "malformed_prompt": "the prompt's image delimiters are malformed (see blindsight.Layout.from_input_ids)",
    "no_template": "the profile has no template and none was given: pass BackendOptions(template=...)",
    "autograd": "BlindSight runs without autograd only: run inference under torch.no_grad() or "
                "torch.inference_mode()",
    "dropout": "attention dropout is on (training mode?): call model.eval()",
    "unknown_mask": "the attention mask could not be inspected at compile time",
    "mask_and_is_causal": "SDPA was given both a mask and is_causal=True",
    "recompile_limit": "Dynamo hit its recompile limit and runs a function without torch.compile, so its "
                       "attention is not sparse; raise torch._dynamo.config.recompile_limit, compile only the "
                       "language model, or use blindsight.attach(model, profile) (no compilation)",
    "not_recompiled": "Dynamo ran this forward without compiling it for a new shape (torch.compiler.set_stance("
                      "'eager_on_recompile')?), so its attention is not sparse",
    "uncompiled": "Dynamo ran a forward without compiling it (a compile error under suppress_errors?), so its "
                  "attention is not sparse; set torch._dynamo.config.suppress_errors=False to see the error",
}


def count(name: str, n: int = 1) -> None:
    if not n:
        return
    with _LOCK:
        _COUNTS[name] += n


def record_fallback(reason: str, n: int = 1, warn_always: bool = False) -> None:
    """Count ``n`` attention calls that ran dense for ``reason``; warn the first time (or always)."""
    count(f"fallback.{reason}", n)
    if reason in QUIET_FALLBACKS and not warn_always:
        return
    with _LOCK:
        first = reason not in _WARNED
        _WARNED.add(reason)
    if first or warn_always:
        advice = FALLBACK_ADVICE.get(reason, "")
        warnings.warn(f"BlindSight: {n} attention call(s) ran dense ({reason})" + (f": {advice}" if advice else ""),
                      stacklevel=3)


def stats() -> dict[str, int]:
    """A snapshot of the counters (names like ``sparse_calls``, ``block_masks_built``, ``fallback.<reason>``)."""
    with _LOCK:
        return dict(sorted(_COUNTS.items()))


def sparse_fraction() -> float:
    """Sparse calls / prefill calls that had images and should have been sparse (1.0 when there were none).

    The denominator leaves out the calls that are dense by definition (decode, text-only prompts) and those the
    cost model ran dense because sparse would not have been faster (``not_faster``).
    """
    s = stats()
    sparse = s.get("sparse_calls", 0)
    missed = sum(n for k, n in s.items() if k.startswith("fallback.") and k[9:] not in QUIET_FALLBACKS)
    return 1.0 if sparse + missed == 0 else sparse / (sparse + missed)


def reset_stats() -> None:
    """Clear the counters, and forget which fallbacks were warned about (they warn again)."""
    with _LOCK:
        _COUNTS.clear()
        _WARNED.clear()
