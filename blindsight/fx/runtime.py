"""The backend and its run time: ``torch.compile(model, backend=blindsight_backend(profile))``.

For every graph Dynamo hands over (static or symbolic sizes alike):
1. :func:`~blindsight.fx.sites.find_sites` finds the language model's SDPA calls;
2. :func:`~blindsight.fx.rewrite.rewrite_sites` turns each into ``blindsight::attention`` (in place);
3. the graph is compiled with Inductor from Dynamo's own example inputs, the way Inductor itself is called,
   so a graph with symbolic sizes is never specialised to one call.
At run time :class:`GraphRunner` finds the prompt's layout and runs the compiled graph inside
:func:`~blindsight.lowering.calls_use`; each op then runs sparse, or dense with the reason counted.

Where the layout comes from, in order: a :func:`blindsight.use_layout` block; an ``input_ids`` input of this
graph; the ``input_ids`` of the innermost running model call that has them
(:func:`blindsight.layout.enclosing_input_ids`: Qwen2-VL's language model sees only ``inputs_embeds``, the
VLM forward that called it holds the ids). Only running calls are looked at, so a forward that passes no ids
(``inputs_embeds`` only) never inherits an earlier prompt's layout: it runs dense, counted as
``fallback.no_layout``.
"""

from __future__ import annotations

import logging

import torch

from ..layout import prompt_layout
from ..lowering import calls_use
from ..profile import ModelInfo, Profile, check_template
from ..stats import count, record_fallback
from .options import BackendOptions
from .rewrite import rewrite_sites
from .sites import find_sites, node_value

__all__ = ["blindsight_backend", "BlindSightBackend", "GraphRunner"]

def _placeholder_index(gm: torch.fx.GraphModule, word: str) -> int | None:
    """Index of the 2-D integer placeholder whose name contains ``word`` (Dynamo names them after the source)."""
    for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        val = node_value(n)
        if word in n.name and isinstance(val, torch.Tensor) and val.dim() == 2 and not val.is_floating_point():
            return i
    return None


class GraphRunner:
    """The callable Dynamo gets for one graph: sets the layout for its ops and counts the dense calls."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs, backend: BlindSightBackend):
        options = backend.options
        self.backend, self.options = backend, options
        self.scan = find_sites(gm, backend.profile)
        if self.scan.sites or self.scan.static_fallback:
            backend.check_model()
        self.ids_at = _placeholder_index(gm, "input_ids")
        self.mask_at = _placeholder_index(gm, "attention_mask")
        if self.scan.sites and torch.is_grad_enabled() and any(
                getattr(x, "requires_grad", False) for x in example_inputs):
            # Dynamo guards on grad mode: this graph only ever runs with autograd on
            self.scan.static_fallback["autograd"] += len(self.scan.sites)
            self.scan.sites = []
        found = len(self.scan.sites) + sum(self.scan.static_fallback.values())
        count("sites_found", found)
        count("language_model_graphs", int(found > 0))
        count("sites_rewritten", len(self.scan.sites))
        for reason, n in self.scan.skipped.items():
            count(f"sites_skipped.{reason}", n)
        self.lowering = None
        if self.scan.sites:
            self.lowering = options.lowering_for(node_value(self.scan.sites[0].node.args[0]).device)
            rewrite_sites(gm, self.scan, backend.profile, self.lowering, options.block_size,
                          options.only_if_faster)
        if options.compile_dense:
            from torch._inductor.compile_fx import compile_fx

            count("inductor_compiles")
            self.compiled = compile_fx(gm, example_inputs)
        else:
            self.compiled = gm.forward

    def __call__(self, *args):
        for reason, n in self.scan.static_fallback.items():
            record_fallback(reason, n, self.options.warn_on_fallback)
        if not self.scan.sites:
            return self.compiled(*args)
        layout, reason = self._layout(args)
        with calls_use(layout, reason, self.options.warn_on_fallback):
            return self.compiled(*args)

    def _layout(self, args):
        ids = args[self.ids_at] if self.ids_at is not None else None
        mask = args[self.mask_at] if ids is not None and self.mask_at is not None else None
        return prompt_layout(self.backend.template, ids, mask, self.options.warn_on_fallback)


def _compiled_module():
    """The module whose frame Dynamo is compiling (its ``self``), or None. Read to check the profile."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx().f_locals.get("self")
    except Exception:  # outside Dynamo, or an internal API that changed: the graph-level checks still run
        return None


class BlindSightBackend:
    """The Dynamo backend object :func:`blindsight_backend` returns; one per ``torch.compile`` call.

    It raises Dynamo's per-function recompile limit to ``options.recompile_limit`` (see :class:`BackendOptions`).
    """

    __name__ = "blindsight_backend"

    def __init__(self, profile: Profile, options: BackendOptions):
        self.profile, self.options = profile, options
        self.template = options.template if options.template is not None else profile.template
        self._checked: set = set()
        _watch_recompile_limit()
        limit = options.recompile_limit
        if limit is not None and torch._dynamo.config.recompile_limit < limit:
            torch._dynamo.config.recompile_limit = limit

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        count("graphs_compiled")
        return GraphRunner(gm, example_inputs, self)

    def check_model(self) -> None:
        """Full profile check against the config of the module being compiled (once per config)."""
        module = _compiled_module()
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "to_dict") or id(config) in self._checked:
            return
        try:
            info = ModelInfo.from_config(config)
        except (AttributeError, TypeError, ValueError):
            return  # not a language model's config (nothing to compare)
        self.profile.check_model(info)
        if self.template is not None:
            check_template(self.template, config, self.options.template is not None)
        self._checked.add(id(config))


class _RecompileLimitWatcher(logging.Handler):
    """Counts Dynamo's "hit config.recompile_limit" warnings: from then on that function runs uncompiled."""

    def emit(self, record: logging.LogRecord) -> None:
        if "hit config." in str(record.msg):
            record_fallback("recompile_limit")


_WATCHER = _RecompileLimitWatcher(logging.WARNING)


def _watch_recompile_limit() -> None:
    log = logging.getLogger("torch._dynamo.convert_frame")
    if _WATCHER not in log.handlers:
        log.addHandler(_WATCHER)


def blindsight_backend(profile: Profile, options: BackendOptions | None = None, **overrides) -> BlindSightBackend:
    """A Dynamo backend: ``torch.compile(model, backend=blindsight_backend(profile))``.

    ``options``/``overrides``: see :class:`BackendOptions`. The profile is checked against the model when
    the first language-model attention call is compiled (:class:`ProfileMismatchError`).
    """
    if not isinstance(profile, Profile):
        raise TypeError(f"blindsight_backend needs a blindsight.Profile, got {type(profile).__name__}")
    if options is not None and not isinstance(options, BackendOptions):
        raise TypeError(f"options must be a blindsight.BackendOptions, got {type(options).__name__}")
    if overrides:
        from dataclasses import replace

        options = replace(options or BackendOptions(), **overrides)
    return BlindSightBackend(profile, options or BackendOptions())
