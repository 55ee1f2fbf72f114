"""The compiler pass: ``torch.compile(model, backend=blindsight_backend(profile))`` (DESIGN.md §5).

For every Dynamo graph:
1. ``find_sites`` finds the ``scaled_dot_product_attention`` calls of the language model's decoder layers
   (layer index from ``node.meta["nn_module_stack"]``; vision-tower attention and anything it cannot handle
   stay untouched, with the reason counted).
2. ``rewrite_sites`` rewrites a copy of the graph: each site becomes ``blindsight_sdpa`` (FlexAttention with
   a BlockMask whose H dimension carries the layer's per-head categories), fed by new graph inputs that carry
   the layout and the per-category tiles of the current prompt.
3. At run time ``GraphRunner`` finds the prompt's layout (``use_layout`` context, else an ``input_ids`` input
   of this graph, else the ``input_ids`` last seen by a graph of this backend) and runs the sparse graph, or
   the original graph (dense) when the call cannot be sparse: decode, no images, no usable layout. Both are
   compiled with Inductor; the sparse one at its first sparse call, outside Dynamo's tracing (its new inputs
   have no Dynamo source).

Shapes: the sparse graph needs static sizes. A graph that Dynamo hands over with symbolic sizes (automatic
dynamic shapes after a length change) runs dense, counted as ``fallback.dynamic_shapes``; compile with
``dynamic=False`` to get one sparse graph per prompt length.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import re
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.nn.attention.flex_attention import flex_attention

from .layout import Layout, LayoutError, Template
from .lowering import default_scale, segment_attention
from .masks import BaseMask, assemble_block_mask, category_tiles, generate_blindsight_mask_mod
from .profile import Profile, ProfileMismatchError
from .stats import count

__all__ = ["blindsight_backend", "BackendOptions", "use_layout", "UnsupportedAttentionError", "find_sites", "language_model_sdpa_nodes"]

SDPA_TARGETS = {torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_LAYER = re.compile(r"(?:^|\.)layers[.\[](\d+)\]?\.self_attn$")
_VISION = re.compile(r"vision|visual", re.IGNORECASE)


class UnsupportedAttentionError(RuntimeError):
    """The language model's attention does not go through scaled_dot_product_attention."""


@dataclass(frozen=True)
class BackendOptions:
    """Options of :func:`blindsight_backend`.

    - ``template``: how images are marked in ``input_ids``; default: the profile's model template.
    - ``block_size``: FlexAttention tile size (query and key).
    - ``warn_on_fallback``: warn when a call runs dense.
    - ``compile_dense``: compile graphs and calls that stay dense with Inductor (default), or run them as
      traced (``False``: faster start-up, e.g. in tests; the sparse graph is always compiled by Inductor).
    - ``lowering``: how a sparse call runs. ``"flex"``: FlexAttention with the per-head BlockMask (the GPU
      lowering and the reference); ``"segments"``: SDPA per image segment over gathered keys
      (:mod:`blindsight.lowering`), faster on CPU where the flex kernel is slow; ``"auto"`` (default):
      segments on CPU, flex elsewhere, as measured on this project's machines (DESIGN §7, bench/).
    """

    template: Template | None = None
    block_size: int = 128
    warn_on_fallback: bool = False
    compile_dense: bool = True
    lowering: str = "auto"

    def __post_init__(self):
        if self.template is not None and not isinstance(self.template, Template):
            raise TypeError(f"BackendOptions.template must be a blindsight.Template, got {type(self.template).__name__}")
        if not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"BackendOptions.block_size must be a power of two >= 16, got {self.block_size!r}")
        if self.lowering not in ("auto", "flex", "segments"):
            raise ValueError(f"BackendOptions.lowering must be 'auto', 'flex' or 'segments', got {self.lowering!r}")

    def lowering_for(self, device: torch.device) -> str:
        if self.lowering != "auto":
            return self.lowering
        return "segments" if device.type == "cpu" else "flex"


# ---- layout at run time ------------------------------------------------------------------------------
_ACTIVE_LAYOUT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("blindsight_layout", default=None)


@contextlib.contextmanager
def use_layout(layout: Layout):
    """Use this layout for every BlindSight attention call inside the block (e.g. a model fed ``inputs_embeds``)."""
    token = _ACTIVE_LAYOUT.set(layout)
    try:
        yield layout
    finally:
        _ACTIVE_LAYOUT.reset(token)


# ---- site discovery ----------------------------------------------------------------------------------
@dataclass
class Site:
    node: torch.fx.Node
    layer: int
    q_len: int
    kv_len: int
    batch: int
    mask_kind: str  # "causal", "none", "bool", "additive"
    scale: float | None
    enable_gqa: bool


@dataclass
class SiteScan:
    sites: list[Site] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> number of SDPA nodes left alone
    static_fallback: Counter = field(default_factory=Counter)  # reason -> LM sites that can never be sparse


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    return re.sub(r"\[(\d+)\]", r".\1", path)


def language_model_layer(path: str) -> int | None:
    """Decoder-layer index of a language-model attention module path (``...layers.7.self_attn``), else None.

    Vision modules (any path component mentioning vision/visual) never match. Shared by the compiler pass
    (Dynamo's ``nn_module_stack`` paths) and calibration (``named_modules`` names).
    """
    m = _LAYER.search(path) if path and not _VISION.search(path) else None
    return int(m.group(1)) if m else None


def _sdpa_args(node: torch.fx.Node) -> dict:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
    out = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    out.update(dict(zip(names, node.args)))
    out.update(node.kwargs)
    return out


def _val(node):
    """The fake value of a node: Dynamo's graphs carry ``example_value``, traced ones ``val``."""
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, torch.fx.Node) else None


def _static(*sizes) -> bool:
    return all(isinstance(s, int) for s in sizes)


def language_model_sdpa_nodes(gm: torch.fx.GraphModule) -> tuple[list[tuple[torch.fx.Node, int]], int]:
    """``([(sdpa node, decoder layer index)], number of other SDPA nodes)`` of a graph.

    A language-model call is one whose innermost module is ``...layers.<i>.self_attn`` outside any vision
    module. Raises :class:`UnsupportedAttentionError` when the graph runs language-model attention modules
    but none of them calls SDPA (eager or another attention implementation).
    """
    found, others, lm_attention_modules = [], 0, set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        path = _module_path(node)
        layer = language_model_layer(path)
        if layer is not None:
            lm_attention_modules.add(path)
        if node.target not in SDPA_TARGETS:
            continue
        if layer is not None:
            found.append((node, layer))
        else:
            others += 1
    if lm_attention_modules and not found:
        raise UnsupportedAttentionError(not_sdpa_message(sorted(lm_attention_modules)[0]))
    return found, others


def not_sdpa_message(module: str) -> str:
    return (
        f"the language model's attention ({module}, ...) does not call scaled_dot_product_attention, so "
        'BlindSight cannot use it. Load the model with attn_implementation="sdpa" '
        '(e.g. from_pretrained(..., attn_implementation="sdpa")).'
    )


def find_sites(gm: torch.fx.GraphModule, profile: Profile) -> SiteScan:
    """Language-model SDPA calls of a graph that can be sparse, checked against the profile.

    Everything else is counted by reason: left alone (``skipped``) or language-model calls that always run
    dense in this graph (``static_fallback``: decode, dynamic shapes, ...).
    """
    scan = SiteScan()
    nodes, others = language_model_sdpa_nodes(gm)
    if others:
        scan.skipped["not_language_model"] += others
    for node, layer in nodes:
        a = _sdpa_args(node)
        q, k, mask = _val(a["query"]), _val(a["key"]), a["attn_mask"]
        B, H, S, D = q.shape
        _check_profile(profile, layer, q, k, a["enable_gqa"])
        mval = _val(mask)
        if a["dropout_p"] not in (0, 0.0):
            reason = "dropout"
        elif mask is not None and mval is None:
            reason = "unknown_mask"
        elif mval is not None and a["is_causal"]:
            reason = "mask_and_is_causal"
        else:
            reason = None
        if reason:
            scan.skipped[reason] += 1
            continue
        if not _static(B, S, k.shape[-2], *(mval.shape if mval is not None else ())):
            scan.static_fallback["dynamic_shapes"] += 1
        elif S == 1:
            scan.static_fallback["decode"] += 1
        elif S != k.shape[-2]:
            scan.static_fallback["not_self_attention"] += 1
        else:
            kind = ("causal" if a["is_causal"] else "none") if mval is None else (
                "bool" if mval.dtype == torch.bool else "additive")
            scan.sites.append(Site(node, layer, S, k.shape[-2], B, kind, a["scale"], bool(a["enable_gqa"])))
    return scan


def _check_profile(profile: Profile, layer: int, q, k, enable_gqa) -> None:
    info = profile.model
    problems = []
    if layer >= info.num_layers:
        problems.append(f"the model has a decoder layer {layer}, the profile only {info.num_layers} layers")
    if q.shape[1] != info.num_heads:
        problems.append(f"num_heads: profile has {info.num_heads}, model has {q.shape[1]}")
    if q.shape[-1] != info.head_dim:
        problems.append(f"head_dim: profile has {info.head_dim}, model has {q.shape[-1]}")
    if k.shape[1] != q.shape[1] and k.shape[1] != info.num_kv_heads:
        problems.append(f"num_kv_heads: profile has {info.num_kv_heads}, model has {k.shape[1]}")
    if problems:
        raise ProfileMismatchError(
            f"profile for {info.model_type!r} does not fit this model: " + "; ".join(problems)
            + ". Calibrate this model (blindsight calibrate) or load its own profile."
        )


# ---- the rewrite -------------------------------------------------------------------------------------
@torch.library.custom_op("blindsight::materialize", mutates_args=())
def materialize(x: torch.Tensor) -> torch.Tensor:
    """A copy that Inductor cannot fuse away.

    Inductor's CPU flex kernel (torch 2.13) takes the buffers a mask_mod/score_mod captures by name before
    it realizes them, and fails ("NotImplementedError: Pointwise") when one is an unrealized computation of
    the graph, such as the mask transformers builds in-graph or a constant. A custom op is an extern
    kernel, so its output is always a real buffer.
    """
    return x.clone()


@materialize.register_fake
def _(x):
    return torch.empty_like(x)


def blindsight_sdpa(q, k, v, attn_mask, image, sink, partial_c, full_c, *, heads, scale, is_causal, block,
                    lowering="flex"):
    """FlexAttention equivalent of ``sdpa(q, k, v, attn_mask, is_causal=..., scale=...)`` AND the heads' categories.

    Traced into the rewritten graph (Inductor fuses mask_mod and score_mod into its flex kernel).
    ``partial_c``/``full_c``: per-category tiles ``[4, B, nq, nk]`` of the layout, with a causal base when
    ``is_causal`` and no base when the call has a mask (its tiles are intersected here).
    ``lowering="segments"``: the CPU lowering of :mod:`blindsight.lowering` instead (tiles unused).
    """
    if lowering == "segments":
        return segment_attention(q, k, v, attn_mask, image, sink, list(heads), default_scale(q, scale), is_causal)
    head_index = materialize(torch.tensor(heads, dtype=torch.int64, device=q.device))
    score_mod = None
    if attn_mask is None:
        base, allowed = (BaseMask() if is_causal else BaseMask(causal=False)), None
    elif attn_mask.dtype == torch.bool:
        allowed = materialize(attn_mask)
        base = BaseMask.from_tensor(allowed)
    else:  # additive float mask: -inf entries are masked, the rest is a bias on the scaled scores
        allowed = materialize(attn_mask != float("-inf"))
        base = BaseMask.from_tensor(allowed)
        bias = materialize(attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]))

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, q_idx, kv_idx].to(score.dtype)

    mask_mod = generate_blindsight_mask_mod(image, sink, head_index, base)
    block_mask = assemble_block_mask(partial_c, full_c, head_index, mask_mod, q.shape[2], block, allowed)
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                          enable_gqa=q.shape[1] != k.shape[1])


_EXTRA_INPUTS = ("image", "sink", "causal_partial", "causal_full", "free_partial", "free_full")


def rewrite_sites(gm: torch.fx.GraphModule, scan: SiteScan, profile: Profile, block: int,
                  lowering: str = "flex") -> torch.fx.GraphModule:
    """A copy of ``gm`` whose sites call :func:`blindsight_sdpa`; new inputs (``_EXTRA_INPUTS``) go last."""
    # Dynamo reads its own placeholders' metadata after the backend returns: work on a copy of the graph.
    graph = copy.deepcopy(gm.graph)
    new_gm = torch.fx.GraphModule(gm, graph)
    index = {n.name: n for n in graph.nodes}
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    extra = {}
    with graph.inserting_after(last_placeholder):
        for name in reversed(_EXTRA_INPUTS):
            extra[name] = graph.placeholder(f"blindsight_{name}")
    for site in scan.sites:
        node = index[site.node.name]
        a = _sdpa_args(node)
        tiles = ("causal" if site.mask_kind == "causal" else "free")
        with graph.inserting_before(node):
            new = graph.call_function(
                blindsight_sdpa,
                (a["query"], a["key"], a["value"], a["attn_mask"], extra["image"], extra["sink"],
                 extra[f"{tiles}_partial"], extra[f"{tiles}_full"]),
                {"heads": tuple(int(c) for c in profile.layer_categories(site.layer)), "scale": site.scale,
                 "is_causal": site.mask_kind == "causal", "block": (block, block), "lowering": lowering},
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    new_gm.recompile()
    return new_gm


# ---- run time ----------------------------------------------------------------------------------------
def _placeholder_index(gm: torch.fx.GraphModule, word: str) -> int | None:
    """Index of the 2-D integer placeholder whose name contains ``word`` (Dynamo names them after the source)."""
    for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        val = _val(n)
        if word in n.name and isinstance(val, torch.Tensor) and val.dim() == 2 and not val.is_floating_point():
            return i
    return None


class GraphRunner:
    """The callable Dynamo gets for one graph: picks sparse or dense per call and counts why."""

    def __init__(self, gm, example_inputs, backend: "BlindSightBackend"):
        profile, options = backend.profile, backend.options
        self.backend, self.options = backend, options
        self.scan = find_sites(gm, profile)
        self.ids_at = _placeholder_index(gm, "input_ids")
        self.mask_at = _placeholder_index(gm, "attention_mask")
        # compiled at its first call: a prefill-only workload whose calls are all sparse never compiles it
        self._dense, self._gm = (None, gm) if options.compile_dense else (gm.forward, None)
        self.lowering = options.lowering_for(_val(self.scan.sites[0].node).device) if self.scan.sites else None
        self.rewritten = (rewrite_sites(gm, self.scan, profile, options.block_size, self.lowering)
                          if self.scan.sites else None)
        self.sparse = None
        count("sites_found", len(self.scan.sites) + sum(self.scan.static_fallback.values()))
        count("sites_rewritten", len(self.scan.sites))
        for reason, n in self.scan.skipped.items():
            count(f"sites_skipped.{reason}", n)

    def __call__(self, *args):
        if self.ids_at is not None:
            self.backend.recorded.value = (args[self.ids_at], args[self.mask_at] if self.mask_at is not None else None)
        for reason, n in self.scan.static_fallback.items():
            self._fallback(reason, n)
        if not self.scan.sites:
            return self.dense(*args)
        layout, reason = self._layout(args)
        if reason is not None:
            self._fallback(reason, len(self.scan.sites))
            return self.dense(*args)
        extra = self._extra_inputs(layout)
        if self.sparse is None:
            from torch._inductor.compile_fx import compile_fx

            count("sparse_compiles")
            with warnings.catch_warnings():
                # printed while Inductor traces the rewritten graph; the generated kernel is the fused one
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                self.sparse = compile_fx(self.rewritten, list(args) + extra)
        count("sparse_calls", len(self.scan.sites))
        count(f"lowering.{self.lowering}", len(self.scan.sites))
        return self.sparse(*args, *extra)

    def dense(self, *args):
        if self._dense is None:
            from torch._inductor.compile_fx import compile_fx

            count("dense_compiles")
            self._dense, self._gm = compile_fx(self._gm, list(args)), None
        return self._dense(*args)

    def _fallback(self, reason: str, n: int) -> None:
        count(f"fallback.{reason}", n)
        if self.options.warn_on_fallback:
            warnings.warn(f"BlindSight: {n} attention call(s) ran dense: {reason}", stacklevel=3)

    def _layout(self, args) -> tuple[Layout | None, str | None]:
        site = self.scan.sites[0]
        layout = _ACTIVE_LAYOUT.get()
        if layout is None:
            template = self.backend.template
            if template is None:
                return None, "no_template"
            if self.ids_at is not None:
                ids, mask = args[self.ids_at], args[self.mask_at] if self.mask_at is not None else None
            else:
                ids, mask = getattr(self.backend.recorded, "value", (None, None))
            if ids is None:
                return None, "no_layout"
            if mask is not None and mask.shape != ids.shape:
                mask = None
            try:
                layout = _layout_of(ids, mask, template)
            except LayoutError as e:
                count("malformed_prompts")
                if self.options.warn_on_fallback:
                    warnings.warn(f"BlindSight: malformed prompt, running dense: {e}", stacklevel=3)
                return None, "malformed_prompt"
        if layout.seq_len != site.q_len or layout.batch_size != site.batch:
            return None, "layout_mismatch"
        if not layout.has_images:
            return None, "no_images"
        return layout, None

    def _extra_inputs(self, layout: Layout) -> list[torch.Tensor]:
        block = self.options.block_size
        kinds = {s.mask_kind for s in self.scan.sites}
        device = _val(self.scan.sites[0].node).device
        layout = layout.to(device)
        empty = torch.zeros(0, dtype=torch.bool, device=device)
        flex = self.lowering == "flex"
        causal = category_tiles(layout, BaseMask(), block) if flex and "causal" in kinds else (empty, empty)
        free = category_tiles(layout, BaseMask(causal=False), block) if flex and kinds - {"causal"} else (empty, empty)
        return [layout.image, layout.sink, *causal, *free]


_LAYOUT_MEMO: dict = {}


def _layout_of(ids: torch.Tensor, mask, template: Template) -> Layout:
    """Layout of these ids, memoized on the tensors' identity and version (every graph of a forward asks)."""
    key = (ids.data_ptr(), tuple(ids.shape), ids._version, template,
           None if mask is None else (mask.data_ptr(), mask._version))
    hit = _LAYOUT_MEMO.get(key)
    if hit is not None and torch.equal(hit[0], ids):
        return hit[1]
    layout = Layout.from_input_ids(ids, template, mask)
    _LAYOUT_MEMO.clear()
    _LAYOUT_MEMO[key] = (ids.clone(), layout)
    return layout


class BlindSightBackend:
    """The Dynamo backend object :func:`blindsight_backend` returns; one per ``torch.compile`` call.

    It remembers the ``input_ids`` (and 2-D ``attention_mask``) last seen by one of its graphs, per thread,
    for later graphs of the same forward that see only ``inputs_embeds`` (Qwen2-VL's language model). A
    remembered layout is used only when its batch size and length match the attention call. Graphs of
    another ``torch.compile`` call never share it; to be explicit, use :func:`use_layout`.
    """

    __name__ = "blindsight_backend"

    def __init__(self, profile: Profile, options: BackendOptions):
        self.profile, self.options = profile, options
        self.template = options.template
        if self.template is None and profile.model.template is not None:
            self.template = Template.from_dict(profile.model.template)
        self.recorded = threading.local()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        count("graphs_compiled")
        return GraphRunner(gm, example_inputs, self)


def blindsight_backend(profile: Profile, **options) -> BlindSightBackend:
    """A Dynamo backend: ``torch.compile(model, backend=blindsight_backend(profile))``.

    ``options``: see :class:`BackendOptions`. The profile is checked against the model when the first
    language-model attention call is seen (:class:`ProfileMismatchError`).
    """
    if not isinstance(profile, Profile):
        raise TypeError(f"blindsight_backend needs a blindsight.Profile, got {type(profile).__name__}")
    return BlindSightBackend(profile, BackendOptions(**options))
