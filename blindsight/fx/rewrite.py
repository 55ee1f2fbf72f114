"""The rewrite: each site's SDPA node becomes ``blindsight::attention`` with its layer's per-head categories.

The op takes the same tensors as the SDPA call (no new graph inputs): it reads the prompt's layout at run
time (:func:`blindsight.lowering.calls_use`), so one rewritten graph serves every length and layout that
Dynamo's guards let through, static or symbolic.

A mask that several sites read is materialized once, by ``blindsight::shared_mask`` (Inductor would compute one
per op otherwise). Where the model repeated its key/value heads for SDPA (transformers' ``repeat_kv``, used
whenever it passes a mask, as it does under torch.compile), the op takes the unrepeated tensors instead: the
lowerings handle grouped heads themselves (heads sharing a KV head run in one call), and the copy of K and V per
query head is dropped.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from ..profile import Profile
from ..stats import count
from .sites import SiteScan, node_value, sdpa_args

__all__ = ["rewrite_sites", "unrepeated_kv"]

_ALL = slice(None)


def _is_new_axis_2(index) -> bool:
    """``x[:, :, None]`` or ``x[:, :, None, :, :]``: a new axis at dim 2 of a 4-D tensor."""
    return (isinstance(index, tuple) and 3 <= len(index) <= 5 and index[:3] == (_ALL, _ALL, None)
            and all(i == _ALL for i in index[3:]))


def _is_method(node, name: str) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target == name


def unrepeated_kv(node) -> torch.fx.Node | None:
    """The ``[B, KV, S, D]`` tensor that ``node`` repeats per query head as transformers' ``repeat_kv`` does
    (``x[:, :, None].expand(B, KV, rep, S, D).reshape(B, KV * rep, S, D)``), or None for anything else."""
    if not _is_method(node, "reshape") or not _is_method(node.args[0], "expand"):
        return None
    expand = node.args[0]
    axis = expand.args[0]
    if not (isinstance(axis, torch.fx.Node) and axis.op == "call_function" and axis.target is operator.getitem
            and _is_new_axis_2(axis.args[1])) and not (_is_method(axis, "unsqueeze") and axis.args[1:] == (2,)):
        return None
    src = axis.args[0]
    x, e, out = node_value(src), node_value(expand), node_value(node)
    if not all(isinstance(t, torch.Tensor) for t in (x, e, out)) or (x.dim(), e.dim(), out.dim()) != (4, 5, 4):
        return None
    same = [str(a) for a in x.shape] == [str(e.shape[i]) for i in (0, 1, 3, 4)]
    heads = isinstance(out.shape[1], int) and isinstance(e.shape[1], int) and isinstance(e.shape[2], int)
    if not (same and heads and out.shape[1] == e.shape[1] * e.shape[2]
            and [str(a) for a in out.shape[::2]] == [str(a) for a in x.shape[::2]]):
        return None
    return src


def _erase_unused_repeat(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Erase a repeat_kv chain (reshape <- expand <- new axis) node by node, as long as nothing else uses it."""
    for _ in range(3):
        if node.users:
            return
        source = node.args[0]
        graph.erase_node(node)
        node = source


def _shared_masks(graph: torch.fx.Graph, masks: list) -> dict:
    """mask node -> a ``blindsight::shared_mask`` node after it, for each computed mask that several sites read
    (a graph input is one buffer already)."""
    shared = {}
    for mask in masks:
        if (isinstance(mask, torch.fx.Node) and mask.op != "placeholder" and mask not in shared
                and masks.count(mask) > 1):
            with graph.inserting_after(mask):
                node = graph.call_function(torch.ops.blindsight.shared_mask.default, (mask,))
            node.meta = {k: v for k, v in mask.meta.items() if k in ("val", "example_value")}
            shared[mask] = node
    return shared


def rewrite_sites(gm: torch.fx.GraphModule, scan: SiteScan, profile: Profile, lowering: str,
                  block_size: int, only_if_faster: bool = True) -> int:
    """Rewrite ``gm`` in place (only call nodes change; Dynamo's placeholders stay as they are); returns the count."""
    op = torch.ops.blindsight.attention.default
    graph = gm.graph
    masks = _shared_masks(graph, [sdpa_args(site.node)["attn_mask"] for site in scan.sites])
    for site in scan.sites:
        node = site.node
        a = sdpa_args(node)
        # no heads: the op takes the categories of the decoder layer the run time finds running (one-layer graphs)
        heads = [] if site.layer is None else [int(c) for c in profile.layer_categories(site.layer)]
        scale = None if a["scale"] is None else float(a["scale"])
        key, value = a["key"], a["value"]
        k, v = unrepeated_kv(key), unrepeated_kv(value)
        if k is not None and v is not None and str(node_value(k).shape[1]) == str(node_value(v).shape[1]):
            key, value = k, v
            count("kv_repeats_removed")
        mask = masks.get(a["attn_mask"], a["attn_mask"])
        with graph.inserting_before(node):
            new = graph.call_function(
                op, (a["query"], key, value, mask, heads, scale, site.is_causal, lowering, block_size, only_if_faster))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for repeat in (a["key"], a["value"]) if key is not a["key"] else ():
            _erase_unused_repeat(graph, repeat)
        site.node = new
    graph.lint()
    gm.recompile()
    return len(scan.sites)
