"""Tiny offline Mistral 3 (transformers 5.23 ``mistral3``): Mistral text decoder + Pixtral vision tower (2D RoPE,
all images in one sequence with a block-diagonal mask) + RMSNorm / 2x2 patch merger / MLP projector.

Ids (word-level tokenizer): 0 <unk>, 1 <s>, 2 </s>, 3 <pad>, 4.. text words ``w{i}``; 250 [IMG]
(config.image_token_id / image_token_index), 251 [IMG_BREAK], 252 [IMG_END].

Vision: patch 4, spatial_merge_size 2 -> one [IMG] per 8x8 pixels. The image processor resizes an image to fit a
64-pixel longest edge (only ever down), rounded up to multiples of 8: (h, w) -> (h // 8) rows of (w // 8) [IMG]
each; so (64, 64) -> 8 x 8, (32, 64) -> 4 x 8, (48, 24) -> 6 x 3, (16, 40) -> 2 x 5.

PixtralProcessor's module imports the torchvision image processor, absent here: ``make_processor`` imports it with
that module replaced by the PIL one (the processor only needs its ``get_resize_output_image_size``), and ``prompt``
runs the real processor; ``expected_ids`` writes the same ids by hand.
"""

from __future__ import annotations

import functools

import torch

from ._common import images as rand_images
from ._common import word_ids, word_tokenizer, words

TEXT = dict(model_type="mistral", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2,
            pad_token_id=3, sliding_window=None)
VISION = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              head_dim=16, image_size=64, patch_size=4)
IMAGE_TOKEN_ID, BREAK_ID, END_ID = 250, 251, 252
PATCH, MERGE, LONGEST = 4, 2, 64


def build(attn_implementation: str = "sdpa"):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    cfg = Mistral3Config(text_config=dict(TEXT), vision_config=dict(VISION), image_token_index=IMAGE_TOKEN_ID,
                         spatial_merge_size=MERGE, vision_feature_layer=-1)
    cfg._attn_implementation = attn_implementation
    model = Mistral3ForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 3
    return model


@functools.cache
def tokenizer():
    ids = {"[IMG]": IMAGE_TOKEN_ID, "[IMG_BREAK]": BREAK_ID, "[IMG_END]": END_ID}
    return word_tokenizer(list(ids), ids, base=("<unk>", "<s>", "</s>", "<pad>"))


@functools.cache
def image_processor():
    from transformers.models.pixtral import PixtralImageProcessorPil

    return PixtralImageProcessorPil(size={"longest_edge": LONGEST}, patch_size={"height": PATCH, "width": PATCH})




def prompt(images, texts, seed=0) -> dict:
    """``images``: list of (height, width) pixel sizes (random RGB content); ``texts[i]`` words before image i,
    ``texts[len(images)]`` after the last. The real processor's input_ids, attention_mask, pixel_values
    (n_images, 3, max_h, max_w: zero-padded) and image_sizes (n_images, 2) = the resized (h, w)."""
    assert len(texts) == len(images) + 1
    parts = []
    for i, n in enumerate(texts):
        parts += words(n, 7 * i + seed)
        if i < len(images):
            parts.append("[IMG]")
    out = make_processor()(text=[" ".join(parts)], images=rand_images(images, seed) if images else None,
                           return_tensors="pt")
    return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}


def resized(height, width):
    """Hand-written after pixtral get_resize_output_image_size: scale down to fit LONGEST, ceil to multiples of 8."""
    import math

    step = PATCH * MERGE
    ratio = max(height / LONGEST, width / LONGEST)
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    return step * ((height - 1) // step + 1), step * ((width - 1) // step + 1)


def expected_ids(images, texts, seed=0) -> list[int]:
    ids = []
    for i, n in enumerate(texts):
        ids += word_ids(n, 7 * i + seed)
        if i < len(images):
            h, w = resized(*images[i])
            run = ([IMAGE_TOKEN_ID] * (w // 8) + [BREAK_ID]) * (h // 8)
            ids += run[:-1] + [END_ID]
    return ids


@functools.cache
def make_processor():
    """The real ``PixtralProcessor`` (what Mistral-3 checkpoints ship), imported with torchvision's Pixtral image
    processor module replaced by the PIL one (it only needs ``get_resize_output_image_size`` from it)."""
    import sys
    import types

    from transformers.models.pixtral import image_processing_pil_pixtral as pil

    name = "transformers.models.pixtral.image_processing_pixtral"
    saved = sys.modules.get(name)
    sys.modules[name] = types.SimpleNamespace(get_resize_output_image_size=pil.get_resize_output_image_size)
    try:
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor

        return PixtralProcessor(image_processor=image_processor(), tokenizer=tokenizer(), patch_size=PATCH,
                                spatial_merge_size=MERGE)
    finally:
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved
