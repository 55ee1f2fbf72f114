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

``--chunk N`` (:func:`run_chunked`) measures the prompt prefilled N tokens at a time instead, as chunked
prefill and cached prefixes run it (DESIGN §2, queries at an offset): one layer over the same chunks, dense SDPA
with each chunk's mask vs BlindSight, against the same ideal; the prompt unchunked; and a whole prefill in chunks.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

import torch

from ..flops import attention_flops, prefill_flops
from ..layout import Layout, input_ids_from_spec
from ..lowering import layout_plan, resolve_lowering
from ..masks import BaseMask, clear_block_mask_cache
from ..masks.block import category_tiles
from ..profile import ModelInfo, Profile
from ..progress import alternating_medians, median_time
from ..progress import steps as progress_steps
from ..template import Template
from .presets import DEMO_LAYOUT, DEMO_MIX

BENCH_TEMPLATE = Template((252,), (253,), (250,), 1)


@dataclass(frozen=True)
class BenchConfig:
    layout: str = DEMO_LAYOUT
    heads: int = 12  # query heads per layer (a count; a layer's categories are ``heads`` elsewhere)
    kv_heads: int = 2
    head_dim: int = 128
    dtype: str = "float32"
    mix: str = DEMO_MIX
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
        resolve_lowering(self.lowering, "cpu")  # raises for an unknown name
        if self.recompile_prompts < 0:
            raise ValueError("recompile_prompts must be >= 0")




def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_extra_bytes(fn) -> int | None:
    """Peak resident memory ``fn()`` adds above what the process holds before it (Linux; None elsewhere)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident size
    except OSError:
        return None
    before = _rss_bytes("VmRSS")
    fn()
    peak = _rss_bytes("VmHWM")
    return None if before is None or peak is None else max(0, peak - before)


def sample_rows(layout: Layout, n: int = 512, seed: int = 0) -> torch.Tensor:
    """Query rows an exactness check covers: each segment's first, sink and last rows, the text rows around
    it, and ``n`` random rows (all rows when the prompt has fewer)."""
    S = layout.seq_len
    if S <= n:
        return torch.arange(S)
    img = layout.image[0]
    edges = ((img[1:] != img[:-1]).nonzero().flatten() + 1).tolist()
    picks = {0, S - 1} | {min(S - 1, max(0, e + d)) for e in edges for d in (-1, 0, 1)}
    picks |= set(layout.sink[0].nonzero().flatten().tolist())
    picks |= set(torch.randperm(S, generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return torch.tensor(sorted(picks))


def max_error_on_rows(out, q, k, v, layout: Layout, heads, rows: torch.Tensor, chunk: int = 64) -> float:
    """max |out - reference| over ``rows``: SDPA in float32 with the definition's mask, a few rows at a time
    (a dense S x S reference at 64K tokens would not fit in memory)."""
    from ..masks import reference_mask

    rep = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    err = 0.0
    for i in range(0, rows.numel(), chunk):
        r = rows[i:i + chunk]
        rq = r.to(q.device)
        mask = reference_mask(layout, heads, rows=r).to(q.device)
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, rq].float(), kf, vf, attn_mask=mask)
        err = max(err, (out[:, :, rq].float() - ref).abs().max().item())
    return err


def random_qkv(cfg: BenchConfig, S: int):
    """One layer's q ``[1, heads, S, d]`` and k, v ``[1, kv_heads, S, d]`` in the config's dtype, seeded."""
    dtype = getattr(torch, cfg.dtype)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, cfg.heads, S, cfg.head_dim, generator=g).to(dtype)
    k, v = (torch.randn(1, cfg.kv_heads, S, cfg.head_dim, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def attention_point(cfg: BenchConfig, layout: Layout, heads, repeat: int | None = None, check_rows: int = 512) -> dict:
    """One layer's attention on ``layout``: compiled dense SDPA vs BlindSight (forced sparse, and with its
    defaults, where the cost model may run it dense), ideal, exactness on sampled rows, extra memory."""
    from ..lowering import LOWERINGS, predicted_work, sparse_attention
    from ..lowering.cost import predicted_seconds

    lowering = resolve_lowering(cfg.lowering, "cpu")
    dtype = getattr(torch, cfg.dtype)
    repeat = repeat or cfg.repeat
    S = layout.seq_len
    q, k, v = random_qkv(cfg, S)
    dense = torch.compile(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True), dynamic=False)

    def sparse(only_if_faster=False):  # what a rewritten site runs (the op's body runs eagerly in the graph)
        return sparse_attention(q, k, v, None, layout, heads, None, True, lowering, only_if_faster=only_if_faster)

    with torch.no_grad():
        t = alternating_medians({"dense": lambda: dense(q, k, v), "sparse": sparse, "default": lambda: sparse(True)},
                                repeat)
        t_dense, t_sparse, t_default = t["dense"], t["sparse"], t["default"]
        out = sparse()
        checked = sample_rows(layout, check_rows)
        err = max_error_on_rows(out, q, k, v, layout, heads, checked)
        del out
        mem_dense = peak_extra_bytes(lambda: dense(q, k, v))
        mem_sparse = peak_extra_bytes(sparse)
        work_sparse, work_dense = predicted_work(q, k, None, layout, heads, True, lowering)
    rates = LOWERINGS[lowering].rates(q.device, dtype, cfg.head_dim)
    one_layer = Profile.from_categories([heads], ModelInfo("bench", 1, cfg.heads, cfg.kv_heads, cfg.head_dim))
    attn = attention_flops(layout, one_layer)

    def mb(b):
        return None if b is None else b / 2 ** 20
    return {
        "layout": layout_spec_of(layout), "tokens": S,
        "images": int(layout.image.max()) + 1, "heads": cfg.heads, "kv_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "dtype": cfg.dtype, "categories": [c.json_name for c in heads], "lowering": lowering,
        "dense_attention_s": t_dense, "blindsight_attention_s": t_sparse, "default_attention_s": t_default,
        "speedup": t_dense / t_sparse, "default_speedup": t_dense / t_default, "ideal": attn.ideal_speedup,
        "efficiency": t_dense / t_sparse / attn.ideal_speedup,
        "predicted_speedup": predicted_seconds(work_dense, rates) / predicted_seconds(work_sparse, rates),
        "max_abs_error": err, "checked_rows": int(checked.numel()),
        "dense_extra_mb": mb(mem_dense), "blindsight_extra_mb": mb(mem_sparse),
    }


def layout_spec_of(layout: Layout) -> str:
    """A compact spec of a batch-1 layout: runs of text and images (``text:64,image:496,text:16,...``)."""
    img = layout.image[0]
    parts, start = [], 0
    for i in range(1, img.numel() + 1):
        if i == img.numel() or (img[i] >= 0) != (img[start] >= 0) or (img[i] >= 0 and img[i] != img[start]):
            parts.append(f"{'image' if img[start] >= 0 else 'text'}:{i - start}")
            start = i
    return ",".join(parts)


def run(cfg: BenchConfig, profile: Profile | None = None, progress: bool = True) -> dict:
    from ..categories import parse_mix

    lowering = resolve_lowering(cfg.lowering, "cpu")
    dtype = getattr(torch, cfg.dtype)
    ids = input_ids_from_spec(cfg.layout, BENCH_TEMPLATE)
    layout = Layout.from_input_ids(ids, BENCH_TEMPLATE)
    info = ModelInfo("bench", cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim, BENCH_TEMPLATE.to_dict())
    if profile is None:
        profile = Profile.from_categories([parse_mix(cfg.mix, cfg.heads)] * cfg.layers, info)
    heads = profile.layer_categories(0)
    steps = progress_steps(progress, 3 if cfg.prefill else 2, "bench")

    # (a) one layer's attention
    result = attention_point(cfg, layout, heads)
    result["layout"] = cfg.layout
    partial, full = category_tiles(layout, BaseMask(), 128)
    head_index = torch.tensor([int(c) for c in heads])
    result["tile_density"] = (partial | full)[head_index].float().mean().item()
    next(steps)

    # (b) per-prompt layout cost: layout from ids + what the lowering derives from it, uncached
    #     (flex: per-category tiles; segments: the fast path's plan: chunks, gather indices, masks)
    def new_layout():
        clear_block_mask_cache()
        fresh = Layout.from_input_ids(ids, BENCH_TEMPLATE)
        if lowering == "segments":
            layout_plan(fresh.image[0], fresh.sink[0], [int(c) for c in heads], cfg.heads // cfg.kv_heads, dtype)
        else:
            category_tiles(fresh, BaseMask(), 128)

    result["layout_overhead_ms"] = 1000 * median_time(new_layout, cfg.repeat, warmup=1)
    next(steps)

    # (c) whole prefill of a language model of that shape
    if cfg.prefill:
        result.update(_prefill(cfg, profile, layout, dtype, lowering))
        result["layout_overhead_fraction"] = result["layout_overhead_ms"] / 1000 / result["blindsight_prefill_s"]
        next(steps)
    return result


# the sweep: lengths from 256 to 64K tokens, 2 to 128 images of ~500 tokens (smaller on short prompts)
SWEEP_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


def sweep_layout(tokens: int) -> str:
    """A prompt of ``tokens`` tokens: 64 text, then images (2..128, ~500 tokens each) with 16 text after each,
    and the rest text."""
    images = min(128, max(2, tokens // 512))
    size = (tokens - 64 - 32 - 16 * images) // images
    tail = tokens - 64 - images * (size + 16)
    return f"text:64,(image:{size},text:16)x{images},text:{tail}"


def sweep(cfg: BenchConfig, lengths=SWEEP_LENGTHS, profile: Profile | None = None, progress: bool = True) -> list[dict]:
    """:func:`attention_point` at each length (``repeat`` runs up to 8K tokens, 1 beyond: each is long)."""
    from ..categories import parse_mix

    heads = profile.layer_categories(0) if profile is not None else parse_mix(cfg.mix, cfg.heads)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(lengths), desc="sweep", unit="length")
    out = []
    for n in lengths:
        layout = Layout.from_spec(sweep_layout(n), BENCH_TEMPLATE)
        point = attention_point(cfg, layout, heads, repeat=cfg.repeat if n <= 8192 else 1)
        point["layout"] = sweep_layout(n)
        out.append(point)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(tokens=n, speedup=f"{point['speedup']:.2f}x")
    if bar is not None:
        bar.close()
    return out


def crossover(points: list[dict]) -> int | None:
    """The shortest swept length from which forced-sparse attention is faster than dense at every longer one."""
    wins = [p["speedup"] > 1.0 for p in points]
    for i in range(len(points)):
        if all(wins[i:]):
            return points[i]["tokens"]
    return None


def format_sweep(points: list[dict]) -> str:
    head = (f"{'tokens':>7} {'images':>6} {'dense ms':>10} {'sparse ms':>10} {'speedup':>8} {'ideal':>6} "
            f"{'eff.':>5} {'defaults':>9} {'max err':>8} {'extra MB':>9}")
    rows = [head]
    for p in points:
        extra = "-" if p["blindsight_extra_mb"] is None else f"{p['blindsight_extra_mb']:.0f}"
        rows.append(f"{p['tokens']:>7} {p['images']:>6} {1e3 * p['dense_attention_s']:>10.1f} "
                    f"{1e3 * p['blindsight_attention_s']:>10.1f} {p['speedup']:>7.2f}x {p['ideal']:>5.2f}x "
                    f"{p['efficiency']:>5.2f} {p['default_speedup']:>8.2f}x {p['max_abs_error']:>8.1e} {extra:>9}")
    c = crossover(points)
    rows.append(f"crossover: sparse wins from {c} tokens on" if c else "crossover: sparse never wins in this sweep")
    return "\n".join(rows)


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
    def sparse_call():
        with use_layout(layout):
            return sparse(inputs_embeds=emb)

    with torch.no_grad():
        t = alternating_medians({"dense": lambda: dense(inputs_embeds=emb), "sparse": sparse_call}, cfg.repeat, 2)
    t_dense, t_sparse = t["dense"], t["sparse"]
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




def _mb(x) -> str:
    return "n/a" if x is None else f"{x:.0f} MB"


def format_table(r: dict) -> str:
    rows = [
        ("layout", f"{r['layout']} ({r['tokens']} tokens)"),
        ("shape", f"{r['heads']} heads / {r['kv_heads']} kv, d={r['head_dim']}, {r['dtype']}"),
        ("attention: dense SDPA (compiled)", f"{r['dense_attention_s'] * 1000:.1f} ms"),
        (f"attention: BlindSight ({r['lowering']})", f"{r['blindsight_attention_s'] * 1000:.1f} ms"),
        ("speedup / ideal / efficiency", f"{r['speedup']:.2f}x / {r['ideal']:.2f}x / {r['efficiency']:.2f}"),
        ("with defaults (cost model)", f"{r['default_speedup']:.2f}x (predicted sparse speedup "
                                       f"{r['predicted_speedup']:.2f}x: runs "
                                       f"{'sparse' if r['predicted_speedup'] > 1 else 'dense'})"),
        ("tile density (flex lowering)", f"{100 * r['tile_density']:.1f}%"),
        ("layout overhead", f"{r['layout_overhead_ms']:.1f} ms"),
        ("max |error| vs reference", f"{r['max_abs_error']:.1e} ({r['checked_rows']} rows checked)"),
        ("extra memory: dense / BlindSight", f"{_mb(r['dense_extra_mb'])} / {_mb(r['blindsight_extra_mb'])}"),
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


def chunk_masks(S: int, chunk: int) -> list[tuple[int, int, torch.Tensor]]:
    """(start, end, mask) of each chunk of a prompt of S tokens prefilled ``chunk`` at a time: the bool mask
    ``[1, 1, L, end]`` transformers passes a forward that continues a cache (causal, bottom-right aligned)."""
    out = []
    for o in range(0, S, chunk):
        e = min(S, o + chunk)
        out.append((o, e, (torch.arange(e)[None, :] <= torch.arange(o, e)[:, None])[None, None]))
    return out


def chunked_point(cfg: BenchConfig, layout: Layout, heads, chunk: int, repeat: int | None = None) -> dict:
    """One layer's attention for ``layout`` prefilled ``chunk`` tokens at a time (each chunk's queries over every
    earlier key and its own, with the layout of the sequence so far): dense SDPA with each chunk's mask (what
    transformers runs) vs BlindSight on the same chunks, forced sparse and with its defaults; exactness against
    the definition on sampled rows of the whole prompt; the ideal (chunking keeps the same pairs)."""
    from ..lowering import sparse_attention

    lowering = resolve_lowering(cfg.lowering, "cpu")
    repeat = repeat or cfg.repeat
    S = layout.seq_len
    q, k, v = random_qkv(cfg, S)
    pieces = [(o, e, m, Layout(layout.image[:, :e], layout.sink[:, :e])) for o, e, m in chunk_masks(S, chunk)]

    def dense():
        return [torch.nn.functional.scaled_dot_product_attention(q[:, :, o:e], k[:, :, :e], v[:, :, :e], attn_mask=m,
                                                                 enable_gqa=True) for o, e, m, _ in pieces]

    def sparse(only_if_faster=False):
        return [sparse_attention(q[:, :, o:e], k[:, :, :e], v[:, :, :e], m, prefix, heads, None, False, lowering,
                                 only_if_faster=only_if_faster) for o, e, m, prefix in pieces]

    with torch.no_grad():
        t = alternating_medians({"dense": dense, "sparse": sparse, "default": lambda: sparse(True)}, repeat)
        out = torch.cat(sparse(), 2)
        checked = sample_rows(layout)
        err = max_error_on_rows(out, q, k, v, layout, heads, checked)
    one_layer = Profile.from_categories([heads], ModelInfo("bench", 1, cfg.heads, cfg.kv_heads, cfg.head_dim))
    ideal = attention_flops(layout, one_layer).ideal_speedup
    return {"chunk": chunk, "chunks": len(pieces), "tokens": S, "lowering": lowering,
            "dense_chunked_s": t["dense"], "blindsight_chunked_s": t["sparse"], "default_chunked_s": t["default"],
            "chunked_speedup": t["dense"] / t["sparse"], "chunked_default_speedup": t["dense"] / t["default"],
            "ideal": ideal, "chunked_efficiency": t["dense"] / t["sparse"] / ideal, "max_abs_error": err,
            "checked_rows": int(checked.numel())}


def chunked_prefill(cfg: BenchConfig, profile: Profile, layout: Layout, chunk: int) -> dict:
    """The whole prefill of a random-weight language model of the config's shape, ``chunk`` tokens at a time with
    a cache, as a user loop or a server runs it: eager dense SDPA vs ``attach`` (each chunk in ``use_layout`` of
    the sequence so far), and the FLOP ratio of that prefill."""
    from transformers import DynamicCache, Qwen2Config, Qwen2Model

    from ..attention import attach, detach
    from ..layout import use_layout

    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=cfg.hidden, intermediate_size=4 * cfg.hidden, num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                         vocab_size=1024)
    config._attn_implementation = "sdpa"
    model = Qwen2Model(config).eval().to(dtype)
    emb = torch.randn(1, layout.seq_len, cfg.hidden, dtype=dtype)
    spans = [(o, e) for o, e, _ in chunk_masks(layout.seq_len, chunk)]

    def prefill(sparse: bool):
        cache = DynamicCache(config=config)
        for o, e in spans:
            prefix = Layout(layout.image[:, :e], layout.sink[:, :e])
            with use_layout(prefix) if sparse else contextlib.nullcontext():
                model(inputs_embeds=emb[:, o:e], past_key_values=cache, use_cache=True)

    with torch.no_grad():
        t_dense = alternating_medians({"dense": lambda: prefill(False)}, cfg.repeat, 1)["dense"]
        attach(model, profile, lowering=cfg.lowering)
        try:
            t_sparse = alternating_medians({"sparse": lambda: prefill(True)}, cfg.repeat, 1)["sparse"]
        finally:
            detach(model)
    ideal = prefill_flops(layout, profile, config).ideal_speedup
    return {"dense_chunked_prefill_s": t_dense, "blindsight_chunked_prefill_s": t_sparse,
            "chunked_prefill_speedup": t_dense / t_sparse, "prefill_ideal": ideal,
            "chunked_prefill_efficiency": t_dense / t_sparse / ideal}


def run_chunked(cfg: BenchConfig, chunk: int, profile: Profile | None = None, progress: bool = True) -> dict:
    """``blindsight bench --chunk N``: the chunked point, the same prompt unchunked, and the chunked prefill."""
    from ..categories import parse_mix

    layout = Layout.from_input_ids(input_ids_from_spec(cfg.layout, BENCH_TEMPLATE), BENCH_TEMPLATE)
    info = ModelInfo("bench", cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim, BENCH_TEMPLATE.to_dict())
    if profile is None:
        profile = Profile.from_categories([parse_mix(cfg.mix, cfg.heads)] * cfg.layers, info)
    heads = profile.layer_categories(0)
    steps = progress_steps(progress, 3 if cfg.prefill else 2, "bench --chunk")
    result = {"layout": cfg.layout, **chunked_point(cfg, layout, heads, chunk)}
    next(steps)
    whole = attention_point(cfg, layout, heads)
    result.update(unchunked_speedup=whole["speedup"], unchunked_efficiency=whole["efficiency"],
                  dense_unchunked_s=whole["dense_attention_s"])
    next(steps)
    if cfg.prefill:
        result.update(chunked_prefill(cfg, profile, layout, chunk))
        next(steps)
    return result


def format_chunked(r: dict) -> str:
    rows = [("prompt", f"{r['tokens']} tokens in {r['chunks']} chunks of {r['chunk']} ({r['lowering']})"),
            ("one layer, chunked: dense SDPA / BlindSight", f"{1000 * r['dense_chunked_s']:.1f} / "
             f"{1000 * r['blindsight_chunked_s']:.1f} ms ({r['chunked_speedup']:.2f}x, default options "
             f"{r['chunked_default_speedup']:.2f}x)"),
            ("ideal (FLOP ratio) / efficiency", f"{r['ideal']:.2f}x / {r['chunked_efficiency']:.2f}"),
            ("unchunked, for comparison", f"{r['unchunked_speedup']:.2f}x, efficiency {r['unchunked_efficiency']:.2f} "
             f"(dense unchunked {1000 * r['dense_unchunked_s']:.1f} ms)"),
            ("max |error| vs definition", f"{r['max_abs_error']:.1e} on {r['checked_rows']} rows")]
    if "chunked_prefill_speedup" in r:
        rows.append(("whole prefill in chunks: dense / BlindSight", f"{r['dense_chunked_prefill_s']:.2f} / "
                     f"{r['blindsight_chunked_prefill_s']:.2f} s ({r['chunked_prefill_speedup']:.2f}x, ideal "
                     f"{r['prefill_ideal']:.2f}x)"))
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)
