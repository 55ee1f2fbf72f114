"""A video as one segment or one segment per frame group: recall and attention FLOPs on the shipped model.

Usage: python bench/video_segments.py [--prompts 8] [--frames 4 8] [--json]

The shipped model (Qwen2-VL architecture) never saw a video, so its prompts here are built from the benchmark
split's shape images: in each prompt, ``frames`` consecutive images become one video (frame pairs are Qwen2-VL's
temporal groups: ``frames / 2`` groups), the other images stay images. Both templates calibrate on the same
prompts; the table gives the mean recall of each sparse category over video prompts (both choices measured in
the same forwards, as ``blindsight calibrate`` reports them), the categories each choice's profile picks, and the
attention FLOP cut of that profile on the prompts' own layouts.
"""

import argparse
import json

import numpy as np
import torch

import blindsight
from blindsight.flops import attention_flops
from blindsight.tools.demo import load_zoo_model
from blindsight.zoo.shapes import make_record


def video_prompt(processor, record: dict, first: int, frames: int) -> dict:
    """The record's prompt with images ``first .. first + frames - 1`` turned into one video."""
    tok = processor.tokenizer
    enc = processor(text=[record["text"]], images=record["images"])
    ids, grids, pix = enc["input_ids"][0].tolist(), enc["image_grid_thw"], enc["pixel_values"]
    vs, ve, img, vid = (tok.convert_tokens_to_ids(t) for t in
                        ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"))
    starts = [i for i, t in enumerate(ids) if t == vs]
    ends = [i for i, t in enumerate(ids) if t == ve]
    rows = grids.prod(-1).tolist()
    offsets = np.cumsum([0] + rows)
    # a temporal group holds two frames: each image's rows are [C, 2, p, p] with the frame repeated
    per = pix.shape[1] // 2
    frame = [pix[offsets[i]:offsets[i + 1]].reshape(rows[i], 3, 2, -1)[:, :, 0] for i in range(len(rows))]
    groups = [torch.stack([frame[first + 2 * g], frame[first + 2 * g + 1]], dim=2).reshape(rows[first], 2 * per)
              for g in range(frames // 2)]
    keep = [i for i in range(len(rows)) if not first <= i < first + frames]
    new_ids = (ids[:starts[first]] + [vs] + [vid] * (rows[first] * frames // 2) + [ve]
               + ids[ends[first + frames - 1] + 1:])
    input_ids = torch.tensor([new_ids])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == img).long() + 2 * (input_ids == vid).long(),
            "pixel_values": torch.cat([pix[offsets[i]:offsets[i + 1]] for i in keep]),
            "image_grid_thw": grids[keep],
            "pixel_values_videos": torch.cat(groups),
            "video_grid_thw": torch.tensor([[frames // 2, *grids[first, 1:].tolist()]])}


def run(prompts: int, frames: int) -> dict:
    model, processor = load_zoo_model()
    rng = np.random.default_rng(3)  # the benchmark split's seed
    samples = []
    for _ in range(prompts):
        record = make_record(rng, min(frames + 2, 9))  # an image before the video (and after, if 9 allow)
        samples.append(video_prompt(processor, record, 1, frames))
    out = {"frames": frames, "prompts": prompts}
    for choice in ("video", "frame"):
        template = blindsight.Template.from_config(model.config, video_segments=choice)
        profile = blindsight.calibrate(model, samples, template=template, progress=False)
        cut = []
        for s in samples:
            layout = blindsight.Layout.from_input_ids(s["input_ids"], template, video_grid_thw=s["video_grid_thw"])
            cut.append(attention_flops(layout, profile).reduction)
        out[choice] = {"mean_recall": profile.calibration["video_segments"][choice],
                       "categories": {c.json_name: n for c, n in profile.counts().items()},
                       "attention_flop_cut": float(np.mean(cut))}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--frames", type=int, nargs="+", default=[4, 8])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    results = [run(args.prompts, f) for f in args.frames]
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print("| frames | segments | recall intra_sink / intra / sink | dense / intra_sink / intra / sink heads | "
          "attention FLOP cut |\n|---|---|---|---|---|")
    for r in results:
        for choice in ("video", "frame"):
            c = r[choice]
            rec = " / ".join(f"{v:.3f}" for v in c["mean_recall"].values())
            cats = " / ".join(str(v) for v in c["categories"].values())
            print(f"| {r['frames']} | {choice} | {rec} | {cats} | {100 * c['attention_flop_cut']:.1f}% |")


if __name__ == "__main__":
    main()
