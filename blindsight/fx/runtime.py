"""The backend and its run time: ``torch.compile(model, backend=blindsight_backend(profile))``.

For every graph Dynamo hands over (static or symbolic sizes alike):
1. :func:`~blindsight.fx.sites.find_sites` finds the language model's SDPA calls;
2. :func:`~blindsight.fx.rewrite.rewrite_sites` turns each into ``blindsight::attention`` (in place);
3. the graph is compiled with Inductor from Dynamo's own example inputs, the way Inductor itself is called,
   so a graph with symbolic sizes is never specialised to one call.
At run time :class:`GraphRunner` finds the prompt's layout and runs the compiled graph inside
:func:`~blindsight.lowering.calls_use`; each op then runs sparse, or dense with the reason counted.

With the cost model on (``only_if_faster``, the default), the graph is also compiled as it came, dense: a
forward whose prompt is so short that no attention call could beat dense, whatever its layout (the calls
alone would cost more: :func:`~blindsight.lowering.never_pays`, from the batch size and length only), runs
that graph, exactly plain ``torch.compile``'s, without looking for a layout; its calls are counted as
``fallback.not_faster`` (``decode`` for one-token forwards).

Where the layout comes from, in order: a :func:`blindsight.use_layout` block; an ``input_ids`` input of this
graph; the ``input_ids`` of the innermost running model call that has them
(:func:`blindsight.sequence.running_prompts`: Qwen2-VL's language model sees only ``inputs_embeds``, the
VLM forward that called it holds the ids). Only running calls are looked at, so a forward that passes no ids
(``inputs_embeds`` only) never inherits an earlier prompt's layout: it runs dense, counted as
``fallback.no_layout``.
"""

from __future__ import annotations

import sys

import torch

from ..cache import BoundedCache
from ..hf import UnsupportedAttentionError, is_tower, one_layer_attention, text_config_key
from ..layout import prompt_layout
from ..lowering import calls_use, never_pays
from ..profile import ModelInfo, Profile, ProfileMismatchError, check_template
from ..sequence import running_prompts
from ..stats import count, record_fallback
from .options import BackendOptions
from .rewrite import rewrite_sites
from .sites import check_layer, find_sites, node_value
from .uncompiled import install, watch

__all__ = ["blindsight_backend", "BlindSightBackend", "GraphRunner"]

# (lowering, the graph's call shapes, batch size, length) -> too short for any call to beat dense?
_SHORT = BoundedCache("fx.short_prompts", max_entries=4096)

def _placeholder_index(gm: torch.fx.GraphModule, word: str) -> int | None:
    """Index of the 2-D integer placeholder whose name contains ``word`` (Dynamo names them after the source)."""
    for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        val = node_value(n)
        if word in n.name and isinstance(val, torch.Tensor) and val.dim() == 2 and not val.is_floating_point():
            return i
    return None


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with a copy of ``gm``'s graph (nodes and their meta), sharing its parameters and buffers."""
    graph = torch.fx.Graph()
    out, node = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(out).meta = dict(node.meta)
    return torch.fx.GraphModule(gm, graph)


def _batch_length_input(gm: torch.fx.GraphModule, q: torch.Tensor) -> int | None:
    """Index of a tensor input whose first two sizes are the query's batch size and length (the same ints, or
    the same symbols), from which a call's (B, S) is read before any layout work."""
    want = (str(q.shape[0]), str(q.shape[2]))
    for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        val = node_value(n)
        if isinstance(val, torch.Tensor) and val.dim() >= 2 and (str(val.shape[0]), str(val.shape[1])) == want:
            return i
    return None


class GraphRunner:
    """The callable Dynamo gets for one graph: sets the layout for its ops and counts the dense calls."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs, backend: BlindSightBackend, layer_type=None,
                 own_attention: str | None = None, tower: bool = False):
        options = backend.options
        self.backend, self.options = backend, options
        # a graph of one decoder layer or attention module (a graph break split the decoder loop or a layer):
        # which layer runs is read per call from the running ``layer_type`` module
        self.layer_type = layer_type
        self.scan = find_sites(gm, backend.profile, own_attention=own_attention if layer_type else None, tower=tower)
        if layer_type is not None and self.scan.sites:
            count("one_layer_graphs")
        # the profile is checked on the first graph of a VLM's own forward too: where the decoder loop is split
        # into one-layer graphs, those carry no config to check it against
        backend.check_model(vlm_only=not (self.scan.sites or self.scan.static_fallback))
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
        self.dense, self.shapes, self.bs_at = None, (), None
        original = None
        if self.scan.sites:
            q = node_value(self.scan.sites[0].node.args[0])
            self.lowering = options.lowering_for(q.device)
            if options.only_if_faster:
                self.bs_at = _batch_length_input(gm, q)
                self.shapes = tuple({shape for s in self.scan.sites for shape in _site_shape(s, backend.profile)})
                original = _copy_graph_module(gm) if self.bs_at is not None else None
            rewrite_sites(gm, self.scan, backend.profile, self.lowering, options.block_size,
                          options.only_if_faster)
        self.compiled = self._compile(gm, example_inputs)
        if original is not None:
            count("dense_variants_compiled")
            self.dense = self._compile(original, example_inputs)

    def _compile(self, gm, example_inputs):
        if not self.options.compile_dense:
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        count("inductor_compiles")
        return compile_fx(gm, example_inputs)

    def _too_short(self, args) -> bool:
        """Would no attention call of this forward beat dense, whatever the layout? (Memoized per (B, S).)"""
        x = args[self.bs_at]
        B, S = int(x.shape[0]), int(x.shape[1])
        return _SHORT.get_or_build((self.lowering, self.shapes, B, S), lambda: all(
            never_pays(self.lowering, device, dtype, B, S, H, kv, D, heads)
            for heads, H, kv, D, dtype, device in self.shapes))

    def __call__(self, *args):
        for reason, n in self.scan.static_fallback.items():
            record_fallback(reason, n, self.options.warn_on_fallback)
        if not self.scan.sites:
            return self.compiled(*args)
        if self.dense is not None and self._too_short(args):
            reason = "decode" if int(args[self.bs_at].shape[1]) == 1 else "not_faster"
            record_fallback(reason, len(self.scan.sites), self.options.warn_on_fallback)
            count("dense_graph_runs")
            return self.dense(*args)
        heads = self._running_layer_heads() if self.layer_type is not None else None
        with calls_use(None, None, self.options.warn_on_fallback, heads, resolve=self._layout(args)):
            return self.compiled(*args)

    def _running_layer_heads(self, max_frames: int = 8) -> tuple[int, ...] | None:
        """The categories of the decoder layer whose frame runs this graph (its caller's ``self``), or None.
        Raises :class:`ProfileMismatchError` when that layer is not in the profile."""
        f = sys._getframe(2)
        for _ in range(max_frames):
            if f is None:
                break
            module = f.f_locals.get("self")
            if type(module) is self.layer_type:
                found = one_layer_attention(module)
                if found is not None:
                    check_layer(self.backend.profile, found[0])
                    return tuple(int(c) for c in self.backend.profile.layer_categories(found[0]))
                break
            f = f.f_back
        return None

    def _layout(self, args):
        """``resolve(key length) -> (layout, reason)`` for this call's ops. The running model calls are found
        here, outside the compiled graph (whose frames hold no model locals); each op asks with its key length,
        the whole sequence's when its queries continue a cache."""
        ids = args[self.ids_at] if self.ids_at is not None else None
        mask = args[self.mask_at] if ids is not None and self.mask_at is not None else None
        prompts = running_prompts()
        template, warn = self.backend.template, self.options.warn_on_fallback
        return lambda query_len, seq_len: prompt_layout(template, ids, mask, warn, seq_len, prompts, query_len)


def _site_shape(site, profile: Profile) -> tuple:
    """(heads, H, KV heads, head dim, dtype, device) of a site's call, from its SDPA node's fake tensors."""
    q, k = node_value(site.node.args[0]), node_value(site.node.args[1])
    layers = range(profile.model.num_layers) if site.layer is None else [site.layer]  # one-layer graphs: any layer
    return [(tuple(int(c) for c in profile.layer_categories(layer)), int(q.shape[1]), int(k.shape[1]),
             int(q.shape[3]), q.dtype, q.device) for layer in layers]


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
        install()  # before Dynamo traces anything: installing it later would fail the guards on transformers' registry
        if options.recompile_limit is not None:
            raise_recompile_limit(options.recompile_limit)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        count("graphs_compiled")
        root = _compiled_module()
        watch(root)
        one_layer = one_layer_attention(root)
        try:
            return GraphRunner(gm, example_inputs, self, type(root) if one_layer is not None else None,
                               one_layer[1] if one_layer is not None else None, tower=is_tower(root))
        except (ProfileMismatchError, UnsupportedAttentionError) as e:
            if torch._dynamo.config.suppress_errors:
                raise  # the user asked Dynamo to run what fails to compile eagerly (counted ``uncompiled``)
            count("graphs_refused")
            return Refused(e)

    def check_model(self, vlm_only: bool = False) -> None:
        """Full profile check against the config of the module being compiled (once per config); ``vlm_only``:
        only if that config is a VLM's (it has a language-model sub-config), not a vision tower's."""
        module = _compiled_module()
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "to_dict") or id(config) in self._checked:
            return
        if vlm_only and text_config_key(config) is None:
            return
        try:
            info = ModelInfo.from_config(config)
        except (AttributeError, TypeError, ValueError):
            return  # not a language model's config (nothing to compare)
        self.profile.check_model(info)
        if self.template is not None:
            check_template(self.template, config, self.options.template is not None)
        self._checked.add(id(config))


class Refused:
    """What Dynamo gets for a graph BlindSight refuses (a profile that does not fit the model, attention that does
    not call SDPA): every call raises that error itself. Raised inside the backend, Dynamo would wrap it in
    ``BackendCompilerFailed``; raised at the call, ``except blindsight.ProfileMismatchError`` catches it."""

    def __init__(self, error: Exception):
        self.error = error

    def __call__(self, *args):
        raise type(self.error)(*self.error.args)  # a new one each call: re-raising one object grows its traceback


def raise_recompile_limit(limit: int) -> None:
    """Dynamo's per-code-object recompile limit to at least ``limit`` in every thread. torch keeps a config value
    set by assignment per thread (a ContextVar), so a model compiled from a server's worker thread would run
    against Dynamo's default (8); the limit's default is raised instead, and the calling thread's value too.
    A thread that set its own limit keeps it."""
    entry = getattr(torch._dynamo.config, "_config", {}).get("recompile_limit")
    if entry is not None and isinstance(getattr(entry, "default", None), int) and entry.default < limit:
        entry.default = limit
    if torch._dynamo.config.recompile_limit < limit:
        torch._dynamo.config.recompile_limit = limit


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
