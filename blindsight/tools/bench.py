"""``blindsight bench``: compiled dense SDPA vs BlindSight, on one layer's attention and on a whole prefill.

All timings are warm, in one process, the median of ``repeat`` runs. Reported:
- ``speedup``: dense attention time / BlindSight attention time (one layer, as the backend lowers it);
- ``ideal``: dense kept (q, k) pairs / BlindSight kept pairs (token level); ``efficiency`` = speedup / ideal;
- ``tile_density``: fraction of FlexAttention tiles computed (partial + full) over all heads;
- ``layout_overhead_ms``: per-prompt cost of a new layout (layout from ids + per-category tiles, or for the
  segments lowering its per-layout plan);
- ``prefill_speedup`` / ``prefill_ideal``: a whole language-model prefill (random weights), torch.compile
  dense vs with ``blindsight_backend``, and the FLOP ratio of that prefill;
- ``recompiles_same_length``: after a warm-up prompt, compilations (Dynamo graphs + sparse graphs) caused by
  ``recompile_prompts`` prompts of one length (``recompile_len`` tokens, fed as ``input_ids``, so the backend
  reads each layout from the ids) whose images sit elsewhere, in other numbers and sizes. It must be 0.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..flops import attention_flops, prefill_flops
from ..layout import Layout, Template, input_ids_from_spec
from ..lowering import layout_plan
from ..masks import BaseMask, clear_block_mask_cache
from ..masks.block import category_tiles
from ..profile import ModelInfo, Profile

BENCH_TEMPLATE = Template((252,), (253,), (250,), 1)


@dataclass(frozen=True)
class BenchConfig:
    layout: str = "text:64,(image:496,text:16)x16,text:80"
    heads: int = 12
    kv_heads: int = 2
    head_dim: int = 128
    dtype: str = "float32"
    mix: str = "dense:3,intra_sink:3,intra:3,sink:3"
    layers: int = 2
    hidden: int = 1536
    repeat: int = 5
    prefill: bool = True
    lowering: str = "auto"
    recompile_prompts: int = 10
    recompile_len: int = 1024

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        if self.repeat < 1:
            raise ValueError("repeat must be >= 1")
        if self.lowering not in ("auto", "flex", "segments"):
            raise ValueError(f"lowering must be auto, flex or segments, got {self.lowering!r}")
        if self.recompile_prompts < 0:
            raise ValueError("recompile_prompts must be >= 0")


def _median_time(fn, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(cfg: BenchConfig, profile: Profile | None = None, progress: bool = True) -> dict:
    from ..categories import parse_mix
    from ..lowering import resolve_lowering, sparse_attention

    lowering = resolve_lowering(cfg.lowering, "cpu")
    dtype = getattr(torch, cfg.dtype)
    ids = input_ids_from_spec(cfg.layout, BENCH_TEMPLATE)
    layout = Layout.from_input_ids(ids, BENCH_TEMPLATE)
    S = layout.seq_len
    info = ModelInfo("bench", cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim, BENCH_TEMPLATE.to_dict())
    if profile is None:
        profile = Profile.from_categories([parse_mix(cfg.mix, cfg.heads)] * cfg.layers, info)
    heads = profile.layer_categories(0)
    steps = _steps(progress, 3 if cfg.prefill else 2)

    # (a) one layer's attention
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, cfg.heads, S, cfg.head_dim, generator=g).to(dtype)
    k, v = (torch.randn(1, cfg.kv_heads, S, cfg.head_dim, generator=g).to(dtype) for _ in range(2))
    dense = torch.compile(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True), dynamic=False)
    partial, full = category_tiles(layout, BaseMask(), 128)
    # what a rewritten site runs (the op's body runs eagerly inside the compiled graph)
    def sparse(q, k, v, image, sink, p, f):
        return sparse_attention(q, k, v, None, layout, heads, None, True, lowering)
    with torch.no_grad():
        t_dense = _median_time(lambda: dense(q, k, v), cfg.repeat)
        t_sparse = _median_time(lambda: sparse(q, k, v, layout.image, layout.sink, partial, full), cfg.repeat)
        err = (sparse(q, k, v, layout.image, layout.sink, partial, full).float() -
               _reference(q, k, v, layout, heads)).abs().max().item()
    next(steps)
    one_layer = Profile.from_categories([heads], ModelInfo("bench", 1, cfg.heads, cfg.kv_heads, cfg.head_dim))
    attn = attention_flops(layout, one_layer)
    head_index = torch.tensor([int(c) for c in heads])
    computed = (partial | full)[head_index].float().mean().item()

    # (b) per-prompt layout cost: layout from ids + what the lowering derives from it, uncached
    #     (flex: per-category tiles; segments: the fast path's plan: chunks, gather indices, masks)
    def new_layout():
        clear_block_mask_cache()
        fresh = Layout.from_input_ids(ids, BENCH_TEMPLATE)
        if lowering == "segments":
            layout_plan(fresh.image[0], fresh.sink[0], [int(c) for c in heads], cfg.heads // cfg.kv_heads, dtype)
        else:
            category_tiles(fresh, BaseMask(), 128)

    t_layout = _median_time(new_layout, cfg.repeat, warmup=1)
    next(steps)
    result = {
        "layout": cfg.layout, "tokens": S, "heads": cfg.heads, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "dtype": cfg.dtype, "categories": [c.json_name for c in heads], "lowering": lowering,
        "dense_attention_s": t_dense, "blindsight_attention_s": t_sparse,
        "speedup": t_dense / t_sparse, "ideal": attn.ideal_speedup, "efficiency": t_dense / t_sparse / attn.ideal_speedup,
        "tile_density": computed, "layout_overhead_ms": 1000 * t_layout, "max_abs_error": err,
    }

    # (c) whole prefill of a language model of that shape
    if cfg.prefill:
        result.update(_prefill(cfg, profile, layout, dtype, lowering))
        result["layout_overhead_fraction"] = t_layout / result["blindsight_prefill_s"]
        next(steps)
    return result


def _reference(q, k, v, layout, heads):
    from ..masks import reference_mask

    mask = reference_mask(layout, heads)
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                            enable_gqa=True)


def _prefill(cfg: BenchConfig, profile: Profile, layout: Layout, dtype, lowering: str) -> dict:
    from transformers import Qwen2Config, Qwen2Model

    from ..fx import blindsight_backend
    from ..layout import use_layout

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden, num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                         vocab_size=1024)
    config._attn_implementation = "sdpa"
    model = Qwen2Model(config).eval().to(dtype)
    emb = torch.randn(1, layout.seq_len, cfg.hidden, dtype=dtype)
    torch._dynamo.reset()
    dense = torch.compile(model, dynamic=False)
    sparse = torch.compile(model, backend=blindsight_backend(profile, lowering=lowering), dynamic=False)
    with torch.no_grad():
        t_dense = _median_time(lambda: dense(inputs_embeds=emb), cfg.repeat)
        with use_layout(layout):
            t_sparse = _median_time(lambda: sparse(inputs_embeds=emb), cfg.repeat)
    flops = prefill_flops(layout, profile, config)
    result = {"dense_prefill_s": t_dense, "blindsight_prefill_s": t_sparse, "prefill_speedup": t_dense / t_sparse,
              "prefill_ideal": flops.ideal_speedup, "prefill_efficiency": t_dense / t_sparse / flops.ideal_speedup}
    if cfg.recompile_prompts:
        result.update(_recompiles(sparse, cfg.recompile_prompts, cfg.recompile_len))
    return result


def arrangements(length: int, n: int) -> list[str]:
    """``n`` layout specs of ``length`` tokens, each with another number, size and place of images."""
    specs = []
    most = max(1, min(8, length // 64))
    for i in range(n):
        images = 1 + i % most
        lead = 1 + 7 * i % max(1, length // 16)
        size = (length - lead - 1 - 16 * images) // images - i // most  # each prompt: another size or place
        if size < 3:
            raise ValueError(f"recompile_len {length} is too short for {images} images")
        tail = length - lead - images * (size + 16)
        specs.append(f"text:{lead},(image:{size},text:16)x{images},text:{tail}")
    return specs


def _recompiles(model, n: int, length: int) -> dict:
    """Compilations caused by ``n`` prompts of one length with images elsewhere, after a warm-up prompt."""
    from ..stats import stats

    ids = [input_ids_from_spec(spec, BENCH_TEMPLATE) for spec in arrangements(length, n + 1)]

    def compiles():
        s = stats()
        return s.get("graphs_compiled", 0) + s.get("sparse_compiles", 0), s.get("sparse_calls", 0)

    with torch.no_grad():
        model(input_ids=ids[0])  # warm-up: this length's graphs (dynamic=False)
        before, calls = compiles()
        for x in ids[1:]:
            model(input_ids=x)
        after, calls_after = compiles()
    return {"recompiles_same_length": after - before, "recompile_prompts": n, "recompile_len": length,
            "recompile_sparse_calls": calls_after - calls}


def _steps(enabled: bool, total: int):
    if enabled:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="bench", unit="step")
        for _ in range(total):
            yield bar.update(1)
        bar.close()
    else:
        while True:
            yield None


def format_table(r: dict) -> str:
    rows = [
        ("layout", f"{r['layout']} ({r['tokens']} tokens)"),
        ("shape", f"{r['heads']} heads / {r['kv_heads']} kv, d={r['head_dim']}, {r['dtype']}"),
        ("attention: dense SDPA (compiled)", f"{r['dense_attention_s'] * 1000:.1f} ms"),
        (f"attention: BlindSight ({r['lowering']})", f"{r['blindsight_attention_s'] * 1000:.1f} ms"),
        ("speedup / ideal / efficiency", f"{r['speedup']:.2f}x / {r['ideal']:.2f}x / {r['efficiency']:.2f}"),
        ("tile density (flex lowering)", f"{100 * r['tile_density']:.1f}%"),
        ("layout overhead", f"{r['layout_overhead_ms']:.1f} ms"),
        ("max |error| vs reference", f"{r['max_abs_error']:.1e}"),
    ]
    if "prefill_speedup" in r:
        rows += [
            ("prefill: dense (compiled)", f"{r['dense_prefill_s'] * 1000:.1f} ms"),
            ("prefill: BlindSight", f"{r['blindsight_prefill_s'] * 1000:.1f} ms"),
            ("prefill speedup / ideal / efficiency",
             f"{r['prefill_speedup']:.2f}x / {r['prefill_ideal']:.2f}x / {r['prefill_efficiency']:.2f}"),
            ("layout overhead / sparse prefill", f"{100 * r['layout_overhead_fraction']:.2f}%"),
        ]
    if "recompiles_same_length" in r:
        rows.append((f"recompiles: {r['recompile_prompts']} prompts x {r['recompile_len']} tokens, images moved",
                     f"{r['recompiles_same_length']} ({r['recompile_sparse_calls']} sparse calls)"))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)
