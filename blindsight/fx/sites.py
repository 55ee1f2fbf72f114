"""Site discovery: the language model's ``scaled_dot_product_attention`` calls in a Dynamo graph.

A site is an SDPA node whose innermost module is ``...layers.<i>.self_attn`` outside any vision module
(layer index from ``node.meta["nn_module_stack"]``), in a graph whose root module is not a vision tower; in a
graph of one decoder layer or one attention module, that module's own attention (layer read at run time). Each
check reads ``node.meta["val"]`` (Dynamo: ``example_value``) and says why a node is not rewritten rather than
raising; what is not handled stays untouched and is counted: ``skipped`` for SDPA calls that are not the
language model's, ``static_fallback`` for language-model calls that always run dense in this graph
(counted again at every call).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx

from ..hf import UnsupportedAttentionError, language_model_layer, not_sdpa_message
from ..profile import Profile, ProfileMismatchError

__all__ = ["Site", "SiteScan", "find_sites", "language_model_sdpa_nodes", "sdpa_args", "node_value", "module_path",
           "check_layer", "SDPA_TARGETS"]

SDPA_TARGETS = {torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


@dataclass
class Site:
    node: torch.fx.Node
    layer: int | None  # None: the graph holds one decoder layer, which one is known at run time
    is_causal: bool
    scale: float | None


@dataclass
class SiteScan:
    sites: list[Site] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> SDPA nodes left alone (not the language model)
    static_fallback: Counter = field(default_factory=Counter)  # reason -> language-model calls always dense here


def module_path(node: torch.fx.Node) -> str:
    """The innermost module of a node, as a dotted path (``model.language_model.layers.0.self_attn``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    return re.sub(r"\[(\d+)\]", r".\1", path)


def sdpa_args(node: torch.fx.Node) -> dict:
    """An SDPA node's arguments by name, defaults filled in."""
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
    out = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    out.update(dict(zip(names, node.args)))
    out.update(node.kwargs)
    return out


def node_value(node):
    """The fake value of a node: Dynamo's graphs carry ``example_value``, traced ones ``val``."""
    return node.meta.get("val", node.meta.get("example_value")) if isinstance(node, torch.fx.Node) else None


def language_model_sdpa_nodes(gm: torch.fx.GraphModule, own_attention: str | None = None,
                              tower: bool = False) -> tuple[list[tuple[torch.fx.Node, int | None]], int]:
    """``([(sdpa node, decoder layer index)], number of other SDPA nodes)`` of a graph.

    ``own_attention``: the graph's root module runs one decoder layer's attention
    (:func:`~blindsight.hf.one_layer_attention`), at this path from the root (``"self_attn"`` for a decoder layer,
    ``""`` for the attention module itself): its SDPA calls are sites whose layer (None here) the run time reads
    from the running module.
    ``tower``: the graph's root module is a vision or audio tower (:func:`~blindsight.hf.is_tower`): its paths
    (``encoder.layers.0.self_attn``) look like a language model's, but none of its SDPA calls is one.

    Raises :class:`UnsupportedAttentionError` when the graph runs language-model attention modules but none of
    them calls SDPA (eager or another attention implementation).
    """
    found, others, lm_attention_modules = [], 0, set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        path = module_path(node)
        layer = None if tower else language_model_layer(path)
        own = own_attention is not None and path == own_attention and not tower
        if layer is not None or own:
            lm_attention_modules.add(path)
        if node.target not in SDPA_TARGETS:
            continue
        if layer is not None or own:
            found.append((node, layer))
        else:
            others += 1
    if lm_attention_modules and not found:
        raise UnsupportedAttentionError(not_sdpa_message(max(sorted(lm_attention_modules), key=bool)))
    return found, others


def check_layer(profile: Profile, layer: int, problems: list[str] | None = None) -> None:
    """Raise :class:`ProfileMismatchError` when the model's decoder layer ``layer`` is not in the profile (or
    ``problems`` were found)."""
    info = profile.model
    problems = list(problems or ())
    if layer is not None and layer >= info.num_layers:
        problems.insert(0, f"the model has a decoder layer {layer}, the profile only {info.num_layers} layers")
    if problems:
        raise ProfileMismatchError(
            f"profile for {info.model_type!r} does not fit this model: " + "; ".join(problems)
            + ". Calibrate this model (blindsight calibrate) or load its own profile."
        )


def check_site_shape(profile: Profile, layer: int | None, q, k) -> None:
    """Raise :class:`ProfileMismatchError` when a site's layer or head shape does not fit the profile."""
    info = profile.model
    problems = []
    if q.shape[1] != info.num_heads:
        problems.append(f"num_heads: profile has {info.num_heads}, model has {q.shape[1]}")
    if q.shape[-1] != info.head_dim:
        problems.append(f"head_dim: profile has {info.head_dim}, model has {q.shape[-1]}")
    if k.shape[1] != q.shape[1] and k.shape[1] != info.num_kv_heads:
        problems.append(f"num_kv_heads: profile has {info.num_kv_heads}, model has {k.shape[1]}")
    check_layer(profile, layer, problems)


def _static_reason(a: dict, q, k, mask, mval) -> str | None:
    """Why a language-model SDPA call can never be sparse in this graph, or None."""
    if a["dropout_p"] not in (0, 0.0):
        return "dropout"
    if mask is not None and mval is None:
        return "unknown_mask"
    if mval is not None and a["is_causal"] is not False:
        return "mask_and_is_causal"
    if not isinstance(a["is_causal"], bool):
        return "unknown_mask"
    S, KV = q.shape[-2], k.shape[-2]
    if isinstance(S, int) and S == 1:
        return "decode"
    if isinstance(S, int) and isinstance(KV, int) and S > KV:  # fewer queries than keys: at an offset (DESIGN §2)
        return "not_self_attention"
    return None


def find_sites(gm: torch.fx.GraphModule, profile: Profile, own_attention: str | None = None,
               tower: bool = False) -> SiteScan:
    """Language-model SDPA calls of a graph that can be sparse, checked against the profile's shape.

    Sizes may be symbolic (Dynamo's automatic dynamic shapes): the rewritten op reads the real sizes at run time.
    ``own_attention``, ``tower``: the graph's root module runs one decoder layer's attention, or is a vision/audio
    tower (see
    :func:`language_model_sdpa_nodes`).
    """
    scan = SiteScan()
    nodes, others = language_model_sdpa_nodes(gm, own_attention, tower)
    if others:
        scan.skipped["not_language_model"] += others
    for node, layer in nodes:
        a = sdpa_args(node)
        q, k, mask = node_value(a["query"]), node_value(a["key"]), a["attn_mask"]
        check_site_shape(profile, layer, q, k)
        reason = _static_reason(a, q, k, mask, node_value(mask))
        if reason:
            scan.static_fallback[reason] += 1
        else:
            scan.sites.append(Site(node, layer, bool(a["is_causal"]), a["scale"]))
    return scan
