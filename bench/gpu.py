"""The GPU check: the flex lowering's exactness in bf16/fp16 and its speed against SDPA's flash kernel.

    bash bench/gpu.sh                 # on a machine with a CUDA GPU (finishes in a few minutes)
    python bench/gpu.py --device cpu  # the same script on CPU at small sizes (segments lowering), so it runs

1. Exactness: for several layouts (images of different sizes, 1-16 images) and every head category,
   ``sparse_attention`` (every call sparse) against SDPA in float32 with the definition's mask, on sampled rows
   (:func:`blindsight.tools.bench.max_error_on_rows`), in bfloat16 and float16. The tolerance is what dense SDPA in
   the same dtype, given the same mask, misses by (its rounding), twice, plus 1e-5; fails (exit 1) past it.
2. Speed: one layer's attention (12 heads / 2 KV heads, d=128, 3 heads of each category) at 8K, 32K and 128K
   tokens: dense SDPA (flash backend on CUDA) vs the flex lowering, median of CUDA-synchronised runs, with the
   ideal (FLOP ratio) and the cost model's decision. Prints one table; ``--json`` for numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from blindsight.flops import attention_flops
from blindsight.layout import Layout
from blindsight.lowering import dense_attention, predicted_work, resolve_lowering, sparse_attention
from blindsight.profile import Category, ModelInfo, Profile
from blindsight.tools.bench import BENCH_TEMPLATE, max_error_on_rows, sample_rows, sweep_layout

EXACT_LAYOUTS = ["text:7,(image:33,text:5)x3,text:9", "text:64,image:300,text:3,image:41,text:16,image:128,text:20",
                 "text:16,(image:250,text:8)x16,text:30", "text:1,image:1000,text:1"]
MIX = [Category.DENSE, Category.INTRA_SINK, Category.INTRA, Category.SINK] * 3


def _timed(fn, device: torch.device, repeat: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _inputs(layout: Layout, heads: int, kv_heads: int, head_dim: int, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    S = layout.seq_len
    q = torch.randn(1, heads, S, head_dim, generator=g)
    k, v = (torch.randn(1, kv_heads, S, head_dim, generator=g) for _ in range(2))
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def _masked_sdpa_error(q, k, v, layout: Layout, heads, rows: torch.Tensor, chunk: int = 64) -> float:
    """How far SDPA in q's dtype, with the definition's mask, is from float32 SDPA: the dtype's own rounding."""
    from blindsight.masks import reference_mask

    rep = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    err = 0.0
    for i in range(0, rows.numel(), chunk):
        r = rows[i:i + chunk].to(q.device)
        mask = reference_mask(layout, heads, rows=rows[i:i + chunk]).to(q.device)
        low = torch.nn.functional.scaled_dot_product_attention(q[:, :, r], kr, vr, attn_mask=mask)
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, r].float(), kr.float(), vr.float(),
                                                               attn_mask=mask)
        err = max(err, (low.float() - ref).abs().max().item())
    return err


def check_exactness(device: torch.device, lowering: str, dtypes) -> list[dict]:
    rows = []
    for spec in EXACT_LAYOUTS:
        layout = Layout.from_spec(spec, BENCH_TEMPLATE)
        for dtype in dtypes:
            q, k, v = _inputs(layout, 8, 2, 64, dtype, device)
            heads = MIX[:8]
            with torch.no_grad():
                out = sparse_attention(q, k, v, None, layout, heads, None, True, lowering, only_if_faster=False)
                checked = sample_rows(layout, 256)
                err = max_error_on_rows(out, q, k, v, layout, heads, checked)
                tolerance = 2 * _masked_sdpa_error(q, k, v, layout, heads, checked) + 1e-5
            rows.append({"layout": spec, "tokens": layout.seq_len, "dtype": str(dtype).split(".")[-1],
                         "max_abs_error": err, "tolerance": tolerance, "ok": err <= tolerance})
    return rows


def speed(device: torch.device, lowering: str, lengths, dtype, repeat: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION] if device.type == "cuda" else [SDPBackend.FLASH_ATTENTION,
                                                                          SDPBackend.MATH]
    out = []
    for n in lengths:
        layout = Layout.from_spec(sweep_layout(n), BENCH_TEMPLATE)
        q, k, v = _inputs(layout, 12, 2, 128, dtype, device)
        info = ModelInfo("gpu-bench", 1, 12, 2, 128)
        ideal = attention_flops(layout, Profile.from_categories([MIX], info)).ideal_speedup
        def dense(q=q, k=k, v=v):
            return dense_attention(q, k, v, None, None, True)

        def sparse(q=q, k=k, v=v, layout=layout):
            return sparse_attention(q, k, v, None, layout, MIX, None, True, lowering, only_if_faster=False)

        with torch.no_grad():
            with sdpa_kernel(backends):
                t_dense = _timed(dense, device, repeat)
            t_sparse = _timed(sparse, device, repeat)
            sparse_work, dense_work = predicted_work(q, k, None, layout, MIX, True, lowering)
            err = max_error_on_rows(sparse(), q, k, v, layout, MIX, sample_rows(layout, 128))
        out.append({"tokens": layout.seq_len, "images": int(layout.image.max()) + 1, "dtype": str(dtype).split(".")[-1],
                    "dense_ms": 1e3 * t_dense, "blindsight_ms": 1e3 * t_sparse, "speedup": t_dense / t_sparse,
                    "ideal": ideal, "efficiency": t_dense / t_sparse / ideal, "max_abs_error": err,
                    "tile_pairs_over_dense": sparse_work.small_pairs / max(1.0, dense_work.dense_pairs)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (small sizes, segments lowering)")
    p.add_argument("--lengths", default=None, help="comma-separated prompt lengths (default 8K,32K,128K on "
                   "CUDA; 1K,2K on CPU)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu.py: no CUDA device here; run with --device cpu to check the script on CPU", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    lowering = resolve_lowering("auto", device)
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else (
        [8192, 32768, 131072] if cuda else [1024, 2048])
    dtypes = [torch.bfloat16, torch.float16] if cuda else [torch.float32, torch.bfloat16]
    exact = check_exactness(device, lowering, dtypes)
    timing = speed(device, lowering, lengths, torch.bfloat16 if cuda else torch.float32, args.repeat)
    if args.json:
        print(json.dumps({"device": str(device), "lowering": lowering, "exactness": exact, "speed": timing}, indent=1))
    else:
        print(f"exactness ({lowering} lowering on {device}):")
        for r in exact:
            print(f"  {'ok ' if r['ok'] else 'BAD'} {r['dtype']:>8} {r['tokens']:>6} tokens  max|err| "
                  f"{r['max_abs_error']:.1e} (tolerance {r['tolerance']:.1e})  {r['layout']}")
        print(f"speed (12 heads / 2 KV, d=128, 3 of each category, {timing[0]['dtype']}):")
        print(f"  {'tokens':>7} {'images':>6} {'dense ms':>9} {'sparse ms':>9} {'speedup':>8} {'ideal':>6} {'eff.':>5}")
        for r in timing:
            print(f"  {r['tokens']:>7} {r['images']:>6} {r['dense_ms']:>9.1f} {r['blindsight_ms']:>9.1f} "
                  f"{r['speedup']:>7.2f}x {r['ideal']:>5.2f}x {r['efficiency']:>5.2f}")
    return 0 if all(r["ok"] for r in exact) else 1


if __name__ == "__main__":
    sys.exit(main())
