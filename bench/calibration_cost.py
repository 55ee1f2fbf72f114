"""Calibration time and peak memory for one prompt on a Qwen2-VL-2B-width language model (2 layers, random).

Usage: python bench/calibration_cost.py [--images 4 8 16] [--json]
Each size runs in a fresh process so the peak RSS (ru_maxrss) belongs to it alone.
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def one(images: int) -> dict:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    import blindsight

    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=2, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=1536, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2))
    cfg._attn_implementation = "sdpa"
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    # the W1 layout: text:64, (image:496, text:16) x images, text:80 ; 494 placeholders = grid 38 x 52 / 4
    ids, grids = [], []
    ids += [100] * 64
    for _ in range(images):
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * 494 + [cfg.vision_end_token_id] + [100] * 16
        grids.append([1, 38, 52])
    ids += [100] * 80
    input_ids = torch.tensor([ids])
    sample = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "mm_token_type_ids": (input_ids == cfg.image_token_id).long(),
              "pixel_values": torch.randn(images * 38 * 52, 1176), "image_grid_thw": torch.tensor(grids)}
    with torch.no_grad():
        model(**sample, logits_to_keep=1)  # warm-up: the dense forward alone
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        model(**sample, logits_to_keep=1)
        forward = time.perf_counter() - t
    t = time.perf_counter()
    blindsight.calibrate(model, [sample], progress=False)
    cal = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"images": images, "tokens": input_ids.shape[1], "dense_forward_s": round(forward, 2),
            "calibration_s": round(cal, 2), "peak_rss_mb": round(peak / 1024),
            "rss_growth_mb": round((peak - base_rss) / 1024)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    rows = []
    for n in args.images:
        r = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        if not args.json:
            print(rows[-1], flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'tokens':>7}{'dense fwd s':>13}{'calib s':>10}{'peak RSS MB':>13}{'growth MB':>11}")
        for r in rows:
            print(f"{r['tokens']:>7}{r['dense_forward_s']:>13}{r['calibration_s']:>10}{r['peak_rss_mb']:>13}{r['rss_growth_mb']:>11}")


if __name__ == "__main__":
    main()
