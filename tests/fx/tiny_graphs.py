"""Tiny modules shaped like a VLM, for unit tests of site discovery and the rewrite on small graphs.

Module paths are a real VLM's: ``model.language_model.layers.<i>.self_attn`` for the language model and
``model.vision_tower.vision_model.encoder.layers.<i>.self_attn`` for the vision tower (SigLIP's names: its attention
modules are ``layers.<i>.self_attn`` too, which only the vision part of the path tells apart). Each attention module
makes one ``F.scaled_dot_product_attention`` call as transformers' SDPA path does (GQA, ``[B, H, S, D]``).
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from blindsight import Category, ModelInfo, Profile

HIDDEN, HEADS, KV_HEADS = 32, 4, 2
HEAD_DIM = HIDDEN // HEADS
SDPA = F.scaled_dot_product_attention
OP = torch.ops.blindsight.attention.default


class Attention(nn.Module):
    """q/k/v projections and one SDPA call (or, ``eager=True``, the same attention without SDPA); ``dropout``
    applies in training mode only; ``repeat_kv``: K/V repeated per query head as transformers does when it passes a
    mask (``x[:, :, None].expand(...).reshape(...)``), instead of ``enable_gqa``."""

    def __init__(self, causal: bool = True, dropout: float = 0.0, eager: bool = False, repeat_kv: bool = False):
        super().__init__()
        self.causal, self.dropout, self.eager, self.repeat_kv = causal, dropout, eager, repeat_kv
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.reference_mask = None  # [B, H, S, S] bool: an eager reference run uses it instead of is_causal

    def forward(self, x, mask=None, memory=None):
        B, S, _ = x.shape
        src = x if memory is None else memory  # memory: keys and values of another length
        q = self.q_proj(x).view(B, S, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(src).view(B, src.shape[1], KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(src).view(B, src.shape[1], KV_HEADS, HEAD_DIM).transpose(1, 2)
        if self.eager:
            k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
            out = torch.softmax(q @ k.transpose(-1, -2) / HEAD_DIM**0.5, dim=-1) @ v
        elif self.reference_mask is not None:
            out = SDPA(q, k, v, attn_mask=self.reference_mask, enable_gqa=True)
        else:
            causal = self.causal and mask is None
            dropout = self.dropout if self.training else 0.0  # as transformers passes it
            if self.repeat_kv:
                rep = HEADS // KV_HEADS
                k, v = (t[:, :, None, :, :].expand(B, KV_HEADS, rep, t.shape[2], HEAD_DIM).reshape(B, HEADS, t.shape[2],
                                                                                              HEAD_DIM) for t in (k, v))
            out = SDPA(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, enable_gqa=not self.repeat_kv)
        return out.transpose(1, 2).reshape(B, S, HEADS * HEAD_DIM)


class Layer(nn.Module):
    def __init__(self, **attention):
        super().__init__()
        self.self_attn = Attention(**attention)
        self.mlp = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x, mask=None, memory=None):
        x = x + self.self_attn(x, mask, memory)
        return x + self.mlp(x)


class Stack(nn.Module):
    def __init__(self, layers: int, **attention):
        super().__init__()
        self.layers = nn.ModuleList(Layer(**attention) for _ in range(layers))

    def forward(self, x, mask=None, memory=None):
        for layer in self.layers:
            x = layer(x, mask, memory)
        return x


class VisionModel(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.encoder = Stack(layers, causal=False)

    def forward(self, x):
        return self.encoder(x)


class VisionTower(nn.Module):
    """SigLIP's nesting (Gemma-3): ``vision_tower.vision_model.encoder.layers.<i>.self_attn``."""

    def __init__(self, layers: int):
        super().__init__()
        self.vision_model = VisionModel(layers)

    def forward(self, x):
        return self.vision_model(x)


class Inner(nn.Module):
    def __init__(self, layers: int, vision_layers: int, **attention):
        super().__init__()
        self.vision_tower = VisionTower(vision_layers)
        self.language_model = Stack(layers, **attention)


class TinyVLM(nn.Module):
    """``model.vision_tower`` (bidirectional SDPA) then ``model.language_model`` (causal SDPA, or with ``mask``);
    in eval mode, as a loaded model is."""

    def __init__(self, layers: int = 2, vision_layers: int = 1, **attention):
        super().__init__()
        torch.manual_seed(0)
        self.model = Inner(layers, vision_layers, **attention)
        self.eval()

    def forward(self, x, mask=None, memory=None):
        x = x + self.model.vision_tower(x)
        return self.model.language_model(x, mask, memory)


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        return torch.relu(self.mlp(x))


class Pooler(nn.Module):
    """SDPA outside any decoder layer (a pooling head): not the language model's attention."""

    def forward(self, x):
        q = x.view(x.shape[0], x.shape[1], HEADS, HEAD_DIM).transpose(1, 2)
        return SDPA(q, q, q).transpose(1, 2).reshape(x.shape)


def profile(layers: int = 2, categories=None, heads: int = HEADS, head_dim: int = HEAD_DIM) -> Profile:
    """A hand-made profile of the tiny language model; default: every category in every layer."""
    info = ModelInfo("tiny", layers, heads, KV_HEADS, head_dim)
    cats = categories or [Category.DENSE, Category.INTRA_SINK, Category.INTRA, Category.SINK][:heads]
    return Profile.from_categories([list(cats)] * layers, info)


def traced(module: nn.Module, x, mask=None, memory=None) -> torch.fx.GraphModule:
    """``symbolic_trace`` (module paths in ``nn_module_stack``) with fake values in ``node.meta["val"]``."""
    given = {"mask": mask, "memory": memory}
    gm = torch.fx.symbolic_trace(module, concrete_args={k: None for k, v in given.items() if v is None})
    with torch.no_grad():
        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x, mask, memory)
    return gm


def captured(module: nn.Module, *inputs, dynamic: bool = False) -> torch.fx.GraphModule:
    """The graph Dynamo hands a backend (``example_value``s, ``L['self']...`` module paths)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend=capture, dynamic=dynamic, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    (gm,) = graphs
    return gm


class Recording:
    """A backend that keeps each graph another backend rewrote (BlindSight rewrites the graph in place)."""

    def __init__(self, backend):
        self.backend, self.graphs = backend, []

    def __call__(self, gm, example_inputs):
        runner = self.backend(gm, example_inputs)
        self.graphs.append(gm)
        return runner


def calls(gm: torch.fx.GraphModule, target) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def sdpa_calls(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    targets = (SDPA, torch._C._nn.scaled_dot_product_attention)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]
