"""A stream of real-looking prompts through the documented calls: compile cost, warm per-prompt time, sparsity.

N prompts of random lengths and layouts (1-6 images of random grids each, text between them) through a random-
weight Qwen2-VL-architecture model, four ways: BlindSight compiled (``torch.compile(model,
backend=blindsight_backend(profile))``, defaults), BlindSight eager (``blindsight.attach``), compiled dense
(``torch.compile(model)``) and eager SDPA. Each runs the stream once with every compilation (reported in
all); then ``--rounds`` warm rounds run each prompt through the four in turn (per prompt the median, then the
mean over prompts), so the modes share the machine's drift. The two BlindSight modes' outputs are
compared with each other (same math, two paths) on the prompts both ran the same way (sparse, or dense where the
cost model predicted no gain), and so are the two dense modes'.

``--grid-scale K`` multiplies each image's grid sides by K (K^2 times the tokens): 1 gives prompts of a few
hundred tokens, which the cost model runs dense; 3 gives ~0.8-4K tokens, where sparse attention pays.

    python bench/stream.py [--prompts 12] [--grid-scale 1] [--rounds 5] [--json]
                           [--hidden 256 --layers 4 --heads 8 --kv-heads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time

import torch

import blindsight
from blindsight import Category, Profile, blindsight_backend

GRIDS = [(8, 8), (8, 16), (16, 16), (16, 24), (24, 16), (12, 20)]  # patches; /4 placeholders each (64-96 tokens)


def build(hidden: int, layers: int, heads: int, kv_heads: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    head_dim = hidden // heads
    third = head_dim // 2 // 8
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                          "mrope_section": [2 * third, 3 * third, 3 * third]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003)
    cfg._attn_implementation = "sdpa"
    return Qwen2VLForConditionalGeneration(cfg).eval()


def make_stream(n: int, seed: int = 0, grid_scale: int = 1) -> list[dict]:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids, types, pix, grids = [], [], [], []
        for _ in range(rng.randint(1, 6)):
            t = rng.randint(4, 40)
            ids += [rng.randint(10, 999) for _ in range(t)]
            types += [0] * t
            h, w = (grid_scale * side for side in rng.choice(GRIDS))
            ids += [1002] + [1000] * (h * w // 4) + [1003]
            types += [0] + [1] * (h * w // 4) + [0]
            pix.append(torch.randn(h * w, 1176, generator=g))
            grids.append([1, h, w])
        ids += [rng.randint(10, 999) for _ in range(rng.randint(8, 40))]
        types += [0] * (len(ids) - len(types))
        out.append({"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                    "mm_token_type_ids": torch.tensor([types]), "pixel_values": torch.cat(pix),
                    "image_grid_thw": torch.tensor(grids)})
    return out


def first_pass(model, prompts, call):
    """Every prompt once (every compilation included): outputs, which prompts ran sparse, and the counters."""
    outs, sparse = [], []
    blindsight.reset_stats()
    cold = 0.0
    with torch.no_grad():
        for p in prompts:
            before = blindsight.stats().get("sparse_calls", 0)
            t = time.perf_counter()
            outs.append(call(model, p))
            cold += time.perf_counter() - t
            sparse.append(blindsight.stats().get("sparse_calls", 0) > before)
    stats = blindsight.stats()
    return (outs, sparse), {"first_pass_s": cold,
                            "sparse_fraction": blindsight.sparse_fraction() if "sparse_calls" in stats else 0.0,
                            "graphs_compiled": stats.get("graphs_compiled", 0)}


def warm_seconds(models: dict, prompts, call, rounds: int) -> dict:
    """Mean over prompts of each prompt's median time, every prompt run by each model in turn, ``rounds`` times:
    this machine drifts by tens of percent over minutes, so modes timed one after another are not comparable."""
    times = {name: [[] for _ in prompts] for name in models}
    with torch.no_grad():
        for _ in range(rounds):
            for i, p in enumerate(prompts):
                for name, model in models.items():
                    t = time.perf_counter()
                    call(model, p)
                    times[name][i].append(time.perf_counter() - t)
    return {name: statistics.mean(statistics.median(ts) for ts in per) for name, per in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--grid-scale", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="warm rounds, the four modes interleaved per prompt")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    base = build(args.hidden, args.layers, args.heads, args.kv_heads)
    mix = [Category(i % 4) for i in range(args.heads)]  # every category, in every layer
    profile = Profile.from_categories([mix] * args.layers, base)
    prompts = make_stream(args.prompts, grid_scale=args.grid_scale)
    lengths = [p["input_ids"].shape[1] for p in prompts]

    def forward(model, p):
        return model(**p, logits_to_keep=1).logits

    modes = {
        "blindsight_compiled": lambda m: torch.compile(m, backend=blindsight_backend(profile)),
        "blindsight_eager": lambda m: blindsight.attach(m, profile),
        "dense_compiled": lambda m: torch.compile(m),
        "dense_eager": lambda m: m,
    }
    results, outputs, models = {}, {}, {}
    torch._dynamo.reset()
    for name, wrap in modes.items():  # one Dynamo cache: the compiled models stay compiled for the warm rounds
        models[name] = wrap(copy.deepcopy(base))
        outputs[name], results[name] = first_pass(models[name], prompts, forward)
    for name, seconds in warm_seconds(models, prompts, forward, args.rounds).items():
        results[name]["warm_per_prompt_s"] = seconds
    for a, b in (("blindsight_compiled", "blindsight_eager"), ("dense_compiled", "dense_eager")):
        # a prompt's output is its sparse attention's or, where the cost model chose dense, the dense one's: compare
        # prompts the two paths ran the same way (the decisions rest on rates each process measures)
        (out_a, sparse_a), (out_b, sparse_b) = outputs[a], outputs[b]
        same = [i for i in range(len(prompts)) if sparse_a[i] == sparse_b[i]]
        results[a]["max_abs_diff_vs_" + b] = max((out_a[i] - out_b[i]).abs().max().item() for i in same)
        results[a]["prompts_decided_differently"] = len(prompts) - len(same)
    for name in modes:
        results[name]["speedup_vs_dense_compiled"] = (results["dense_compiled"]["warm_per_prompt_s"]
                                                      / results[name]["warm_per_prompt_s"])
        results[name]["speedup_vs_dense_eager"] = (results["dense_eager"]["warm_per_prompt_s"]
                                                   / results[name]["warm_per_prompt_s"])
    summary = {"prompts": args.prompts, "tokens_min": min(lengths), "tokens_max": max(lengths),
               "model": vars(args), "modes": results}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{args.prompts} prompts, {min(lengths)}-{max(lengths)} tokens, threads {torch.get_num_threads()}")
        print("| mode | first pass (compiles) | warm per prompt | vs compiled dense | vs eager dense | sparse |")
        print("|---|---|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['first_pass_s']:.1f} s | {1000 * r['warm_per_prompt_s']:.1f} ms | "
                  f"{r['speedup_vs_dense_compiled']:.2f}x | {r['speedup_vs_dense_eager']:.2f}x | "
                  f"{r['sparse_fraction']:.2f} |")
        for name, r in results.items():
            if "prompts_decided_differently" in r:
                other = next(k[len("max_abs_diff_vs_"):] for k in r if k.startswith("max_abs_diff_vs_"))
                print(f"{name} vs {other}: max |diff| {r['max_abs_diff_vs_' + other]:.1e} over the prompts both ran "
                      f"the same way; {r['prompts_decided_differently']} decided differently")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
