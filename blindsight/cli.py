"""The ``blindsight`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from .layout import Layout, Template
from .profile import Category, Profile

# Qwen2-VL-2B's language model and its template: the built-in example of `blindsight flops`.
QWEN2_VL_2B_TEXT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, vocab_size=151936)
DEMO_LAYOUT = "text:64,(image:496,text:16)x16,text:80"
DEMO_MIX = "dense:3,intra_sink:3,intra:3,sink:3"


def parse_mix(mix: str, num_heads: int) -> list[Category]:
    """``"dense:3,intra:9"`` -> per-head categories (counts must add up to ``num_heads``)."""
    heads: list[Category] = []
    for item in mix.split(","):
        name, _, n = item.partition(":")
        heads += [Category.parse(name)] * int(n or 1)
    if len(heads) != num_heads:
        raise ValueError(f"mix {mix!r} gives {len(heads)} heads, the model has {num_heads}")
    return heads


def cmd_flops(args) -> int:
    from transformers import Qwen2VLConfig

    from .flops import prefill_flops
    from .masks import build_block_mask

    config = Qwen2VLConfig(text_config=QWEN2_VL_2B_TEXT)
    template = Template.from_config(config)
    layout = Layout.from_spec(args.layout, template)
    heads = parse_mix(args.mix, QWEN2_VL_2B_TEXT["num_attention_heads"])
    profile = Profile.from_categories([heads] * QWEN2_VL_2B_TEXT["num_hidden_layers"], config)
    flops = prefill_flops(layout, profile, config)
    tiles = {}
    for c in Category:
        bm = build_block_mask(layout, [c])
        tiles[c.json_name] = 1 - bm.sparsity() / 100
    result = {
        "model": "Qwen2-VL-2B language model shape (no weights needed for FLOP accounting)",
        "layout": args.layout,
        "tokens": layout.seq_len,
        "images": int(layout.num_images[0]),
        "attention_flop_reduction": flops.attention.reduction,
        "attention_ideal_speedup": flops.attention.ideal_speedup,
        "prefill_flop_reduction": flops.reduction,
        "tile_density": tiles,
    }
    if args.png:
        from .viz import plot_category_masks

        plot_category_masks(Layout.from_spec(args.picture_layout, template), args.png)
        result["png"] = args.png
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"BlindSight FLOP accounting: {result['model']}")
    print(f"layout {args.layout}: {layout.seq_len} tokens, {result['images']} images; heads per layer: {args.mix}")
    print(f"{'category':<12}{'heads':>6}{'kept pairs':>12}{'tile density':>14}")
    for c in Category:
        v = flops.attention.by_category[c]
        kept = v["blindsight"] / v["dense"] if v["dense"] else 1.0
        print(f"{c.json_name:<12}{v['heads']:>6}{100 * (kept if v['heads'] else 0):>11.1f}%{100 * tiles[c.json_name]:>13.1f}%")
    print(f"attention FLOPs: -{100 * flops.attention.reduction:.1f}% (ideal attention speedup "
          f"{flops.attention.ideal_speedup:.2f}x); whole LM prefill FLOPs: -{100 * flops.reduction:.1f}%")
    if args.png:
        print(f"masks of {args.picture_layout} drawn to {args.png}")
    return 0


def cmd_demo(args) -> int:
    from .demo import DemoConfig, format_report, run

    cfg = DemoConfig(calibration_samples=args.calibration_samples, benchmark_samples=args.samples,
                     threshold=args.threshold, repeat=args.repeat, png=args.png or None, progress=not args.json)
    result = run(cfg)
    if args.json:
        result.pop("profile_summary")
        print(json.dumps(result, indent=1))
    else:
        print(format_report(result))
    return 0


def cmd_eval(args) -> int:
    from .data import jsonl_records, load_processor
    from .evaluate import evaluate, jsonl_examples

    for _ in jsonl_records(args.data):  # validate the whole file before loading a model
        pass
    profile = Profile.load(args.profile)
    model = load_model(args.model, args.dtype, args.device)
    profile.check_model(model)
    processor = load_processor(args.model)
    pad_id = model.generation_config.pad_token_id or 0
    examples = jsonl_examples(args.data, processor, model.config.model_type, args.samples, args.pad_to, pad_id)
    thresholds = [None] if not args.thresholds else [float(t) for t in args.thresholds.split(",")]
    dense, results = evaluate(model, examples, profile, thresholds, progress=not args.json)
    if args.json:
        print(json.dumps({"samples": len(examples), "accuracy_dense": dense,
                          "results": [vars(r) for r in results]}, indent=1))
        return 0
    print(f"{len(examples)} prompts from {args.data}; dense accuracy {100 * dense:.1f}%")
    print(f"{'threshold':>10}{'accuracy':>10}{'delta':>8}{'attn FLOPs':>12}{'prefill FLOPs':>15}  heads d/x/i/s")
    for r in results:
        th = "profile" if r.threshold is None else f"{r.threshold:g}"
        heads = "/".join(str(v) for v in r.categories.values())
        print(f"{th:>10}{100 * r.accuracy:>9.1f}%{100 * (r.accuracy - dense):>+7.1f}"
              f"{-100 * r.attention_flop_reduction:>11.1f}%{-100 * r.prefill_flop_reduction:>14.1f}%  {heads}")
    return 0


def load_model(path: str, dtype: str = "float32", device: str = "cpu"):
    """A transformers VLM from a local directory (or a Hub id already cached), with SDPA attention."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model.to(device).eval()


def _init_distributed(device: str) -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on GPU)."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate
    from .data import jsonl_samples, load_processor, synthetic_samples

    from .data import jsonl_records

    if args.data != "synthetic":
        for _ in jsonl_records(args.data):  # validate the whole file before loading a model
            pass
    rank, world = _init_distributed(args.device)
    model = load_model(args.model, args.dtype, args.device)
    if args.data == "synthetic":
        samples = synthetic_samples(model.config, args.samples or 8, seed=args.seed)
    else:
        processor = load_processor(args.model)
        samples = jsonl_samples(args.data, processor, model.config.model_type, limit=args.samples)
    dense_layers = [int(x) for x in args.dense_layers.split(",")] if args.dense_layers else ()
    profile = calibrate(model, samples, thresholds=args.threshold, quantile=args.quantile,
                        dense_layers=dense_layers, source=f"{args.data} (model {args.model})")
    if rank == 0:
        profile.save(args.out)
        print(profile.summary())
        print(f"profile written to {args.out}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def cmd_inspect(args) -> int:
    from .flops import attention_flops

    profile = Profile.load(args.profile)
    if args.threshold is not None:
        profile = profile.decide(thresholds=args.threshold)
    print(profile.summary())
    if args.layout:
        if profile.model.template is None:
            raise SystemExit(f"{args.profile}: the profile has no image template; cannot build layout {args.layout!r}")
        layout = Layout.from_spec(args.layout, Template.from_dict(profile.model.template))
        f = attention_flops(layout, profile)
        print(f"layout {args.layout} ({layout.seq_len} tokens, {int(layout.num_images[0])} images): attention FLOPs "
              f"-{100 * f.reduction:.1f}% (ideal attention speedup {f.ideal_speedup:.2f}x)")
    if args.png:
        from .viz import plot_profile

        plot_profile(profile, args.png)
        print(f"heatmap written to {args.png}")
    return 0


def cmd_bench(args) -> int:
    from .bench import BenchConfig, format_table, run

    profile = Profile.load(args.profile) if args.profile else None
    shape = {}
    if profile is not None:
        m = profile.model
        shape = dict(heads=m.num_heads, kv_heads=m.num_kv_heads, head_dim=m.head_dim, layers=m.num_layers)
    cfg = BenchConfig(**{**dict(layout=args.layout, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                                dtype=args.dtype, mix=args.mix, layers=args.layers, hidden=args.hidden,
                                repeat=args.repeat, prefill=not args.no_prefill, lowering=args.lowering,
                                recompile_prompts=args.recompile_prompts, recompile_len=args.recompile_len), **shape})
    result = run(cfg, profile, progress=not args.json)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blindsight", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the shipped model: calibrate, accuracy dense vs BlindSight, FLOPs, prefill time")
    d.add_argument("--samples", type=int, default=200, help="benchmark prompts (8 images each)")
    d.add_argument("--calibration-samples", type=int, default=32)
    d.add_argument("--threshold", type=float, default=0.95, help="recall a sparse category must keep")
    d.add_argument("--repeat", type=int, default=5, help="timed prefill runs (median)")
    d.add_argument("--png", default="blindsight-profile.png", help="where to draw the profile heatmap ('' for none)")
    d.add_argument("--json", action="store_true", help="print machine-readable numbers")
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser("flops", help="FLOP accounting of a layout and head mix (Qwen2-VL-2B shape), mask pictures")
    f.add_argument("--layout", default=DEMO_LAYOUT, help="layout spec, e.g. 'text:64,(image:496,text:16)x16,text:80'")
    f.add_argument("--mix", default=DEMO_MIX, help="categories of the 12 heads of every layer")
    f.add_argument("--png", default="blindsight-masks.png", help="where to draw the category masks ('' for none)")
    f.add_argument("--picture-layout", default="text:6,(image:14,text:3)x4,text:6")
    f.add_argument("--json", action="store_true", help="print machine-readable numbers")
    f.set_defaults(func=cmd_flops)

    c = sub.add_parser("calibrate", help="measure each head's recall on multi-image prompts and write a profile")
    c.add_argument("model", help="a directory saved by save_pretrained (or a Hub id already in the local cache)")
    c.add_argument("--data", required=True, help="a JSONL prompt file, or 'synthetic' for random prompts")
    c.add_argument("--out", required=True, help="where to write the profile JSON")
    c.add_argument("--samples", type=int, default=None, help="number of prompts (default: all; synthetic: 8)")
    c.add_argument("--threshold", type=float, default=0.95, help="recall a sparse category must keep")
    c.add_argument("--quantile", type=float, default=0.0, help="quantile over prompts (0 = the worst prompt)")
    c.add_argument("--dense-layers", default="", help="comma-separated layers forced dense")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--device", default="cpu")
    c.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    c.set_defaults(func=cmd_calibrate)

    i = sub.add_parser("inspect", help="print a profile, its FLOP reduction on a layout, draw its heatmap")
    i.add_argument("profile")
    i.add_argument("--layout", default=None, help="layout spec, e.g. 'text:64,(image:496,text:16)x16,text:80'")
    i.add_argument("--threshold", type=float, default=None, help="re-decide with this threshold first")
    i.add_argument("--png", default=None, help="draw a layers x heads heatmap")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("eval", help="accuracy dense vs BlindSight on a multi-image QA JSONL, with a threshold sweep")
    e.add_argument("model", help="a directory saved by save_pretrained (with its processor)")
    e.add_argument("--profile", required=True, help="the model's profile JSON (from blindsight calibrate)")
    e.add_argument("--data", required=True, help='JSONL: {"images": [...], "text": "... <image> ...", "answer": "..."}')
    e.add_argument("--samples", type=int, default=None, help="first N prompts (default: all)")
    e.add_argument("--thresholds", default="", help="comma-separated recall thresholds to re-decide the profile with")
    e.add_argument("--pad-to", type=int, default=64, help="right-pad prompts to a multiple of this (fewer compiles)")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="compiled dense SDPA vs BlindSight: one layer's attention and a whole prefill")
    b.add_argument("--layout", default=DEMO_LAYOUT)
    b.add_argument("--heads", type=int, default=12)
    b.add_argument("--kv-heads", type=int, default=2)
    b.add_argument("--head-dim", type=int, default=128)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g = b.add_mutually_exclusive_group()
    g.add_argument("--mix", default=DEMO_MIX, help="categories of the heads of every layer")
    g.add_argument("--profile", default=None, help="use a profile's categories and shape instead of --mix")
    b.add_argument("--layers", type=int, default=2, help="layers of the prefill model")
    b.add_argument("--hidden", type=int, default=1536, help="hidden size of the prefill model")
    b.add_argument("--repeat", type=int, default=5, help="timed runs (median)")
    b.add_argument("--no-prefill", action="store_true", help="skip the whole-prefill measurement")
    b.add_argument("--lowering", default="auto", choices=["auto", "flex", "segments"])
    b.add_argument("--recompile-prompts", type=int, default=10,
                   help="prefill prompts of one length with images moved, counting compilations (0: skip)")
    b.add_argument("--recompile-len", type=int, default=1024, help="their length in tokens")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
