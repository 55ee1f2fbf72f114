"""What the shipped shapes model's tokens know, and where its answers look (issue #6's diagnostics).

Usage: python bench/zoo_probe.py [MODEL] [--images 4] [--prompts 150] [--ablate] [--json]

Two measurements on held-out prompts (the ``benchmark`` split's generator, its own seed), and a third on request:
- ``probes``: linear probes (logistic regression on standardized hidden states, 3/4 train, 1/4 held out) of
  each image's number (the ``i`` of its label ``<image> image i :``, which follows the image, so an image token
  can only tell it from where it sits), colour and shape, read from the ``<|vision_end|>`` token,
  the image's last placeholder and a middle one, at the input of every decoder layer and after the last.
  Probe accuracy says the information is there, linearly; not that the model uses it.
- ``attention``: for ``find``, ``count`` and ``same`` questions, the attention mass the answer row (the last token)
  puts on the images the question is about, on the other images, and on text, per layer and head (eager
  attention; an image is its segment, delimiters included, as ``blindsight.Layout`` defines it). For
  ``find`` the target is the image that holds the named colour and shape; for ``count`` the images that hold
  the named colour or shape; for ``same`` the two images named by number. Selective attention puts more than
  its share (targets' fraction of image tokens) on the targets. Also the mass on the targets' label number tokens
  (the ``3`` of ``<image> image 3 :``, which follows its image) and on the other images' label number tokens: the
  shipped model is trained to look up labels, at layer 2 head 0 for ``find``, head 1 for ``count`` and head 2 for
  ``same`` (``blindsight.zoo.train.attention_targets``).
- ``ablation`` (``--ablate``): per-task accuracy on the benchmark split (200 prompts of ``--images`` images, the
  README's samples) with the output of layer 2's head 0, 1 or 2, or all three, zeroed (its ``o_proj`` columns).
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from blindsight.layout import Layout, Template  # noqa: E402
from blindsight.tools.demo import load_zoo_model  # noqa: E402
from blindsight.zoo.shapes import COLORS, SHAPES, make_record  # noqa: E402
from blindsight.zoo.train import label_targets  # noqa: E402

TOKENS = ("vision_end", "last_placeholder", "middle_placeholder")
TASKS = ("find", "count", "same")


def _segments(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Image segment of each token of a one-row prompt (-1 for text), as ``blindsight.Layout`` defines it."""
    return Layout.from_input_ids(input_ids, Template.from_config(model.config)).image[0]


@torch.enable_grad()  # callers run under no_grad
def _linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> float:
    """Held-out accuracy of a logistic regression fitted on the first 3/4 of (x, y)."""
    m = len(x) * 3 // 4
    x = (x - x[:m].mean(0)) / (x[:m].std(0) + 1e-6)
    g = torch.Generator().manual_seed(0)
    w = (0.01 * torch.randn(x.shape[1], classes, generator=g)).requires_grad_()
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x[:m] @ w + b, y[:m]) + 1e-3 * w.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ((x[m:] @ w + b).argmax(-1) == y[m:]).float().mean().item()


@torch.no_grad()
def probes(model, processor, images: int = 4, prompts: int = 150, seed: int = 9) -> dict:
    """{token: {"number"|"colour"|"shape": [held-out probe accuracy per hidden state, layer 0 input first]}}."""
    rng = np.random.default_rng(seed)
    states = {t: [] for t in TOKENS}
    labels = []  # (number, colour, shape) per image
    for _ in range(prompts):
        rec = make_record(rng, images, "color")
        enc = dict(processor(text=[rec["text"]], images=rec["images"]))
        hidden = torch.stack(model.model(**enc, output_hidden_states=True).hidden_states)[:, 0]  # [L+1, S, D]
        image = _segments(model, enc["input_ids"])
        for i in range(images):
            segment = (image == i).nonzero().flatten()  # <|vision_start|>, placeholders, <|vision_end|>
            for token, at in zip(TOKENS, (segment[-1], segment[-2], segment[len(segment) // 2])):
                states[token].append(hidden[:, at])
            labels.append((i, list(COLORS).index(rec["items"][i][0]), SHAPES.index(rec["items"][i][1])))
    y = torch.tensor(labels)
    out = {}
    for token, xs in states.items():
        x = torch.stack(xs, 1)  # [L+1, N, D]
        out[token] = {name: [_linear_probe(x[layer].float(), y[:, k], classes) for layer in range(len(x))]
                      for k, (name, classes) in enumerate((("number", images), ("colour", len(COLORS)),
                                                           ("shape", len(SHAPES))))}
    return out


@torch.no_grad()
def attention(model, processor, task: str, images: int = 4, prompts: int = 40, seed: int = 7) -> dict:
    """Answer-row attention for ``task`` (one of :data:`TASKS`): per layer, per head, mean mass on the target
    images, the other images and text; plus the targets' mean share of image tokens and the accuracy."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")  # SDPA does not return probabilities
    rng = np.random.default_rng(seed)
    mass, share, hits = [], [], 0
    try:
        for _ in range(prompts):
            rec = make_record(rng, images, task)
            enc = dict(processor(text=[rec["text"]], images=rec["images"]))
            out = model(**enc, output_attentions=True)
            hits += processor.tokenizer.convert_ids_to_tokens(int(out.logits[0, -1].argmax())) == rec["answer"]
            image = _segments(model, enc["input_ids"])
            words = rec["text"].split("question : ")[1].split()
            targets = ({int(rec["answer"]) - 1} if task == "find" else
                       {int(w) - 1 for w in words if w.isdigit()} if task == "same" else
                       {i for i, (c, s) in enumerate(rec["items"]) if c in words or s in words})
            target = torch.isin(image, torch.tensor(sorted(targets), dtype=image.dtype))
            other = (image >= 0) & ~target
            label = torch.zeros_like(target)
            label[label_targets(processor, enc, [rec])[0][1]] = True  # each label's number token, as training finds it
            target_label = label & torch.roll(target, 2)
            other_label = label & ~target_label
            share.append(target.sum().item() / (image >= 0).sum().item())
            regions = (target, other, image < 0, target_label, other_label)
            mass.append(torch.stack([torch.stack([(p[0, :, -1] * m).sum(-1) for m in regions], -1)
                                     for p in out.attentions]))  # [L, H, 5]
    finally:
        model.set_attn_implementation(implementation)
    m = torch.stack(mass).mean(0)
    return {"accuracy": hits / prompts, "target_share": float(np.mean(share)),
            "layers": [{"target": layer[:, 0].tolist(), "other_images": layer[:, 1].tolist(),
                        "text": layer[:, 2].tolist(),
                        "target_labels": layer[:, 3].tolist(), "other_labels": layer[:, 4].tolist()} for layer in m]}


@torch.no_grad()
def ablation(model, processor, images: int = 4, prompts: int = 200, layer: int = 2) -> dict:
    """{"none"|"head 0"|...: {"all": accuracy, task: accuracy}} with heads of ``layer`` zeroed in turn."""
    from blindsight.tools.evaluate import accuracy, by_task, make_examples
    from blindsight.zoo.shapes import make_records

    examples = make_examples(processor, make_records("benchmark", prompts, min_images=images, max_images=images),
                             "qwen2_vl", pad_to=1)
    attn = model.model.language_model.layers[layer].self_attn
    weight, saved = attn.o_proj.weight, attn.o_proj.weight.detach().clone()
    out = {}
    try:
        for name, heads in (("none", []), ("head 0", [0]), ("head 1", [1]), ("head 2", [2]), ("heads 0-2", [0, 1, 2])):
            weight.copy_(saved)
            for h in heads:
                weight[:, h * attn.head_dim: (h + 1) * attn.head_dim] = 0
            hits = accuracy(model, examples)
            out[name] = {"all": sum(hits) / len(hits), **by_task(examples, hits)}
    finally:
        weight.copy_(saved)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--prompts", type=int, default=150)
    p.add_argument("--ablate", action="store_true", help="also zero layer 2's guided heads in turn (200 prompts)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, processor = load_zoo_model(*([args.model] if args.model else []))
    result = {"probes": probes(model, processor, args.images, args.prompts),
              "attention": {t: attention(model, processor, t, args.images, max(10, args.prompts // 4)) for t in TASKS}}
    if args.ablate:
        result["ablation"] = ablation(model, processor, args.images)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"linear probes, {args.images} images, {args.prompts} prompts "
          "(held-out accuracy; hidden state 0 = embeddings)")
    for token, by_label in result["probes"].items():
        for label, accs in by_label.items():
            print(f"  {token:19s} {label:7s} " + " ".join(f"{a:.2f}" for a in accs))
    for task, r in result["attention"].items():
        print(f"answer-row attention, {task}: accuracy {r['accuracy']:.2f}, "
              f"targets hold {r['target_share']:.2f} of image tokens")
        for i, layer in enumerate(r["layers"]):
            print(f"  layer {i}: " + "  ".join(
                f"h{h} target {t:.2f} other {o:.2f} text {x:.2f} (labels: target {tl:.2f} other {ol:.2f})"
                for h, (t, o, x, tl, ol) in enumerate(zip(layer["target"], layer["other_images"], layer["text"],
                                                           layer["target_labels"], layer["other_labels"]))))
    for name, acc in result.get("ablation", {}).items():
        scores = " ".join(f"{t} {100 * a:.1f}%" for t, a in acc.items())
        print(f"layer 2 {name} zeroed, {args.images} images: {scores}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
