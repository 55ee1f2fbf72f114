"""The rewrite: each site's SDPA node becomes ``blindsight::attention`` with its layer's per-head categories.

The op takes the same tensors as the SDPA call (no new graph inputs): it reads the prompt's layout at run
time (:func:`blindsight.lowering.calls_use`), so one rewritten graph serves every length and layout that
Dynamo's guards let through, static or symbolic.
"""

from __future__ import annotations

import torch
import torch.fx

from ..profile import Profile
from .sites import SiteScan, sdpa_args

__all__ = ["rewrite_sites"]


def rewrite_sites(gm: torch.fx.GraphModule, scan: SiteScan, profile: Profile, lowering: str,
                  block_size: int, only_if_faster: bool = True) -> int:
    """Rewrite ``gm`` in place (only call nodes change; Dynamo's placeholders stay as they are); returns the count."""
    op = torch.ops.blindsight.attention.default
    graph = gm.graph
    for site in scan.sites:
        node = site.node
        a = sdpa_args(node)
        # no heads: the op takes the categories of the decoder layer the run time finds running (one-layer graphs)
        heads = [] if site.layer is None else [int(c) for c in profile.layer_categories(site.layer)]
        scale = None if a["scale"] is None else float(a["scale"])
        with graph.inserting_before(node):
            new = graph.call_function(
                op, (a["query"], a["key"], a["value"], a["attn_mask"], heads, scale, site.is_causal, lowering,
                     block_size, only_if_faster))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        site.node = new
    graph.lint()
    gm.recompile()
    return len(scan.sites)
