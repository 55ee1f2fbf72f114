"""Language-model attention calls that run inside a ``torch.compile``'d call but outside every graph: counted.

Dynamo can run a frame without compiling it: once a code object reaches its recompile limit, Dynamo runs it
eagerly for new shapes, "run-only" (the frames it calls too); under ``suppress_errors`` it runs a frame it failed
to compile eagerly. Such a frame's attention is transformers' own dense SDPA, and no backend ever sees it. To
count those calls one by one, :func:`install` (called by ``blindsight_backend()``, before Dynamo traces anything)
registers a wrapper of transformers' ``"sdpa"`` attention function in its ``AttentionInterface``: the same
function, called unchanged. When Dynamo traces the wrapper, ``torch.compiler.is_compiling()`` is a constant True
and the graph is as before; when the wrapper runs eagerly inside a compiled region (Dynamo's frame callback set)
on the attention of a language model that a BlindSight backend compiles (:func:`watch`), the call is counted:

- ``fallback.recompile_limit``: Dynamo is in run-only mode after a recompile-limit hit;
- ``fallback.not_recompiled``: run-only mode with no hit seen (``torch.compiler.set_stance("eager_on_recompile")``);
- ``fallback.uncompiled``: a frame Dynamo did not compile (``suppress_errors`` after a compile error).

Under ``torch.compiler.set_stance("force_eager")`` or inside ``torch.compiler.disable`` there is no compiled
region: the user asked for eager, nothing is counted. Each recompile-limit hit is also counted as an event,
``recompile_limit_hits``, from Dynamo's warning.
"""

from __future__ import annotations

import logging
import weakref

import torch

from ..hf import is_tower, model_config, text_config
from ..stats import count, record_fallback

__all__ = ["install", "watch", "uncompiled_reason"]

_WATCHED: dict[int, weakref.ref] = {}  # id(language-model config) -> the config, for models a backend compiles
_LIMIT_HIT = [False]  # a recompile-limit hit has been seen in this process


def watch(root) -> None:
    """Count the uncompiled attention calls of the language model of ``root``, a module Dynamo compiles."""
    config = getattr(root, "config", None)
    if config is None or is_tower(root) or not hasattr(config, "to_dict"):
        return
    lm = text_config(model_config(config))
    key = id(lm)
    ref = _WATCHED.get(key)
    if ref is None or ref() is not lm:
        _WATCHED[key] = weakref.ref(lm, lambda _, key=key: _WATCHED.pop(key, None))


def uncompiled_reason(module) -> str | None:
    """Why an eagerly running attention call of ``module`` is outside every compiled graph, or None: not in a
    compiled region, or not the attention of a watched language model."""
    config = getattr(module, "config", None)
    ref = _WATCHED.get(id(config))
    if ref is None or ref() is not config:
        return None
    try:
        from torch._C._dynamo.eval_frame import get_eval_frame_callback

        callback = get_eval_frame_callback()
    except (ImportError, AttributeError):  # an internal API that moved: nothing is counted
        return None
    if callback is None:
        return None  # no torch.compile around this call, or the user asked for eager
    if callback is False:
        return "recompile_limit" if _LIMIT_HIT[0] else "not_recompiled"
    return "uncompiled"


class _RecompileLimitWatcher(logging.Handler):
    """Dynamo's "hit config.recompile_limit" warning: from then on that code object runs uncompiled."""

    def emit(self, record: logging.LogRecord) -> None:
        if "hit config." in str(record.msg):
            _LIMIT_HIT[0] = True
            count("recompile_limit_hits")


_WATCHER = _RecompileLimitWatcher(logging.WARNING)


def install() -> None:
    """Wrap transformers' ``"sdpa"`` attention function and watch Dynamo's log, once per process."""
    log = logging.getLogger("torch._dynamo.convert_frame")
    if _WATCHER not in log.handlers:
        log.addHandler(_WATCHER)
    try:
        from transformers import AttentionInterface
    except ImportError:
        return
    sdpa = AttentionInterface().get("sdpa")
    if sdpa is None or getattr(sdpa, "_blindsight_counted", False):
        return

    def sdpa_attention_forward(module, *args, **kwargs):
        if not torch.compiler.is_compiling():
            reason = uncompiled_reason(module)
            if reason is not None:
                record_fallback(reason)
        return sdpa(module, *args, **kwargs)

    sdpa_attention_forward._blindsight_counted = True
    try:  # never a graph of its own: where Dynamo runs a frame uncompiled, this one runs eagerly and counts
        from torch._dynamo.eval_frame import skip_code

        skip_code(sdpa_attention_forward.__code__)  # only as a frame: Dynamo still inlines it when tracing
    except (ImportError, AttributeError):  # an internal API that moved: such calls may then go uncounted
        pass
    AttentionInterface.register("sdpa", sdpa_attention_forward)
