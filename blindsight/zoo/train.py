"""Train the shipped shapes model: transformers' Qwen2-VL architecture, a few million parameters, on CPU.

``python -m blindsight.zoo.train --out DIR`` trains from scratch on the ``train`` split of
:mod:`blindsight.zoo.shapes` (drawn on the fly from its fixed seed) and saves model and processor with
``save_pretrained``. The loss is the cross-entropy of the one-word answer after ``answer :``. Batches are
right-padded without an attention mask: the model is causal and reads only the last real position, so the
padding after it changes nothing that is used, and SDPA keeps its fast causal path.
Seeds are fixed (weights, data, dropout-free model): the same command gives the same weights on the same
machine and torch build.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from .processor import ShapesProcessor
from .shapes import IMAGE_SIZE, make_record, vocabulary

__all__ = ["ModelSize", "build_processor", "build_model", "collate", "train"]

PATCH_SIZE = 8  # 96 x 96 images: a 12 x 12 patch grid, 36 tokens per image after the 2 x 2 merge


class ModelSize:
    """The shipped model's shape (hidden 128, 4 layers of 4 query / 2 KV heads; vision tower of depth 2)."""

    text = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]})
    vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=PATCH_SIZE,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)


def build_processor() -> ShapesProcessor:
    return ShapesProcessor.build(vocabulary(), IMAGE_SIZE, PATCH_SIZE)


def build_model(processor: ShapesProcessor, seed: int = 0, text: dict | None = None, vision: dict | None = None):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = processor.token_ids()
    vocab = 8 * math.ceil(len(processor.tokenizer) / 8)
    config = Qwen2VLConfig(
        text_config=dict(text or ModelSize.text, vocab_size=vocab, pad_token_id=ids["pad_token_id"],
                         eos_token_id=ids["eos_token_id"], bos_token_id=ids["eos_token_id"]),
        vision_config=dict(vision or ModelSize.vision),
        image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids["pad_token_id"]
    return model


def collate(processor: ShapesProcessor, records: list[dict]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(model inputs without attention mask, index of each row's last real token, answer token ids)."""
    enc = processor([r["text"] for r in records], images=[im for r in records for im in r["images"]])
    last = enc.pop("attention_mask").sum(-1) - 1
    answers = torch.tensor(processor.tokenizer.convert_tokens_to_ids([r["answer"] for r in records]))
    return dict(enc), last, answers


def answer_logits(model, inputs: dict, last: torch.Tensor) -> torch.Tensor:
    """Logits of the token after each row's last real position, ``[B, vocab]``."""
    hidden = model.model(**inputs).last_hidden_state
    return model.lm_head(hidden[torch.arange(len(last)), last])


def train(out: str | None, steps: int = 3000, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
          min_images: int = 2, max_images: int = 8, model=None, processor=None, progress: bool = True,
          log_every: int = 100) -> tuple[object, ShapesProcessor, list[float]]:
    """Train (or continue training ``model``) for ``steps`` AdamW steps; save to ``out`` if given.

    Returns (model, processor, per-step losses). Cosine learning rate with 2% warm-up.
    """
    from tqdm.auto import tqdm

    from .shapes import SPLITS

    processor = processor or build_processor()
    model = model or build_model(processor, seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    rng = np.random.default_rng(SPLITS["train"] + 1000 * seed)
    losses, hits, t0 = [], [], time.time()
    bar = tqdm(range(steps), desc="training", disable=not progress)
    for step in bar:
        n = int(rng.integers(min_images, max_images + 1))  # one image count per batch: little padding
        inputs, last, answers = collate(processor, [make_record(rng, n) for _ in range(batch_size)])
        logits = answer_logits(model, inputs, last)
        loss = torch.nn.functional.cross_entropy(logits, answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        hits.append((logits.argmax(-1) == answers).float().mean().item())
        if (step + 1) % log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.3f}", acc=f"{np.mean(hits[-log_every:]):.3f}",
                            min=f"{(time.time() - t0) / 60:.1f}")
    model.eval()
    if out:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return model, processor, losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to save the model and processor to")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    t = time.time()
    train(args.out, args.steps, args.batch_size, args.lr, args.seed)
    print(f"trained {args.steps} steps in {(time.time() - t) / 60:.1f} min; saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
