"""Tiny offline LLaVA-OneVision (transformers 5.23 ``llava_onevision``): Qwen2 text decoder + SigLIP tower + MLP,
anyres tiling with an ``image_newline`` embedding.

Ids (word-level tokenizer): 0 <pad>, 1 <s>, 2 </s>, 3 <unk>, 4.. text words ``w{i}``; 250 <image>
(config.image_token_id / image_token_index), 251 <video> (config.video_token_id). No other image ids exist: the
whole image, newline slots included, is a run of 250.

Vision: SigLIP at 32x32, patch 8 -> 16 features per tile ("full" strategy: SigLIP has no CLS), grid pinpoints
multiples of 32. One image alone in its sample (``batch_num_images`` 1) is tiled (anyres): 16 base features, then the
unpadded rows x cols feature grid of its best-fit resolution with one ``image_newline`` slot after each row:
(32, 32) -> 16 + 4*(4+1) = 36, (32, 64) -> 16 + 4*(8+1) = 52, (64, 32) -> 16 + 8*(4+1) = 56, (64, 64) -> 16 + 8*9 = 88.
With ``nested=True`` (images passed as [[img, img, ...]], batch_num_images = n > 1) every image is the base tile
only plus one newline slot: 17 tokens, whatever its size.
"""

from __future__ import annotations

import functools
import math

import torch

from ._common import images as rand_images
from ._common import images_only, word_ids, word_tokenizer, words

TEXT = dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, image_size=32, patch_size=8, vision_use_head=False)
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
IMAGE_TOKEN_ID, VIDEO_ID = 250, 251
TILE, PER_TILE = 32, 16


def build(attn_implementation: str = "sdpa"):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaOnevisionConfig(text_config=dict(TEXT), vision_config=dict(VISION), image_token_index=IMAGE_TOKEN_ID,
                               video_token_index=VIDEO_ID, image_grid_pinpoints=PINPOINTS,
                               vision_feature_select_strategy="full", vision_feature_layer=-1,
                               vision_aspect_ratio="anyres_max_9")
    cfg._attn_implementation = attn_implementation
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


@functools.cache
def make_processor():
    """The real ``LlavaOnevisionProcessor`` (LlavaOnevisionImageProcessorPil + word-level tokenizer), offline,
    without a video processor (see ``_common.images_only``)."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision import LlavaOnevisionImageProcessorPil

    tok = word_tokenizer(["<image>", "<video>"], {"<image>": IMAGE_TOKEN_ID, "<video>": VIDEO_ID},
                         extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    ip = LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    with images_only():
        return LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, num_image_tokens=PER_TILE,
                                       vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")




def prompt(images, texts, seed=0, nested=False) -> dict:
    """``images``: list of (height, width) pixel sizes (random RGB content). ``texts[i]`` words before image i,
    ``texts[len(images)]`` after the last. ``nested=False`` passes the images as a flat list (each one tiled,
    token count depends on its size); ``nested=True`` as one sample's list (with 2+ images: multi-image mode, 17
    tokens each).
    Returns input_ids, attention_mask, pixel_values (n_images, max_tiles, 3, 32, 32), image_sizes (n_images, 2),
    batch_num_images."""
    assert len(texts) == len(images) + 1
    parts = []
    for i, n in enumerate(texts):
        parts += words(n, 7 * i + seed)
        if i < len(images):
            parts.append("<image>")
    imgs = rand_images(images, seed) if images else None
    if imgs and nested:
        imgs = [imgs]
    out = make_processor()(text=[" ".join(parts)], images=imgs, return_tensors="pt")
    keep = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images")
    return {k: v for k, v in out.items() if k in keep}


def image_layout(height, width, nested=False):
    """(base, rows, cols): ``base`` features of the whole image resized to 32x32, then ``rows`` rows of ``cols``
    features each followed by one newline slot (the model's ``image_newline`` parameter). Hand-written after
    ``LlavaOnevisionModel.pack_image_features`` / ``unpad_image``; multi-image mode is (16, 0, 0) + 1 newline."""
    from transformers.image_processing_utils import select_best_resolution

    if nested:
        return PER_TILE, 0, 0
    bh, bw = select_best_resolution((height, width), PINPOINTS)
    side = TILE // 8  # features per tile side
    cur_h, cur_w = side * (bh // TILE), side * (bw // TILE)
    if width / height > cur_w / cur_h:  # unpad_image: cut the rows that are padding
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    assert math.sqrt(cur_h * cur_w / (9 * side**2)) <= 1.1  # anyres_max_9 interpolation not reached here
    return PER_TILE, cur_h, cur_w


def expected_ids(images, texts, seed=0, nested=False) -> list[int]:
    ids = []
    for i, n in enumerate(texts):
        ids += word_ids(n, 7 * i + seed)
        if i < len(images):
            multi = nested and len(images) > 1
            base, rows, cols = image_layout(*images[i], nested=multi)
            ids += [IMAGE_TOKEN_ID] * (base + (1 if multi else rows * (cols + 1)))
    return ids
