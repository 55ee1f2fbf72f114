"""Tiny offline InternVL (transformers 5.23 ``internvl``): Qwen2 text decoder + InternViT tower + pixel-shuffle MLP.

Ids (word-level tokenizer, see ``make_processor``): 0 <pad>, 1 <s>, 2 </s>, 3 <unk>, 4.. text words ``w{i}``;
250 <IMG_CONTEXT> (config.image_token_id), 251 <img>, 252 </img>, 253 <video>.

Vision: 32x32 tiles, patch 8 -> 16 patches (+CLS, dropped), pixel shuffle 0.5 -> 4 <IMG_CONTEXT> per tile
(``image_seq_length=4``). An image of any size is cut by GotOcr2 ``crop_to_patches`` into cols x rows tiles of
32x32 (grid chosen by aspect ratio, 1..max_patches=6) plus one thumbnail tile when there is more than one tile, so
its token count is ``4 * num_tiles`` and differs with the image's size / aspect ratio.
"""

from __future__ import annotations

import functools

import torch

from ._common import images as rand_images
from ._common import images_only, word_ids, word_tokenizer, words

TEXT = dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
IMAGE_TOKEN_ID, START_ID, END_ID, VIDEO_ID = 250, 251, 252, 253
TILE, IMAGE_SEQ_LENGTH, MAX_PATCHES = 32, 4, 6


def build(attn_implementation: str = "sdpa"):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(0)
    cfg = InternVLConfig(text_config=dict(TEXT), vision_config=dict(VISION), image_token_id=IMAGE_TOKEN_ID,
                         image_seq_length=IMAGE_SEQ_LENGTH, downsample_ratio=0.5)
    cfg._attn_implementation = attn_implementation
    model = InternVLForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def _tokenizer():
    # InternVLProcessor.__init__ reads tokenizer.{start,end,context}_image_token(_id) and tokenizer.video_token
    return word_tokenizer(
        ["<IMG_CONTEXT>", "<img>", "</img>", "<video>"],
        {"<IMG_CONTEXT>": IMAGE_TOKEN_ID, "<img>": START_ID, "</img>": END_ID, "<video>": VIDEO_ID},
        extra_special_tokens={"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
                              "end_image_token": "</img>", "video_token": "<video>"})


@functools.cache
def make_processor():
    """The real ``InternVLProcessor`` (GotOcr2ImageProcessorPil + word-level tokenizer), built offline, with
    no video processor (see ``_common.images_only``)."""
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil

    ip = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
                                  max_patches=MAX_PATCHES)
    with images_only():
        return InternVLProcessor(image_processor=ip, tokenizer=_tokenizer(), image_seq_length=IMAGE_SEQ_LENGTH)




def prompt(images, texts, seed=0) -> dict:
    """``images``: list of (height, width) pixel sizes; each becomes a random RGB image that the real processor tiles
    (e.g. (32, 32) -> 1 tile = 4 tokens, (32, 64) -> 2 tiles + thumbnail = 12, (64, 64) -> 4 + 1 = 20,
    (32, 96) -> 3 + 1 = 16). ``texts[i]`` words before image i, ``texts[len(images)]`` after the last.
    Returns input_ids, attention_mask, pixel_values (sum(num_tiles), 3, 32, 32)."""
    assert len(texts) == len(images) + 1
    parts = []
    for i, n in enumerate(texts):
        parts += words(n, 7 * i + seed)
        if i < len(images):
            parts.append("<IMG_CONTEXT>")  # processor.image_token (= tokenizer.context_image_token)
    out = make_processor()(text=[" ".join(parts)], images=rand_images(images, seed) if images else None,
                           return_tensors="pt")
    return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask", "pixel_values")}


def expected_ids(images, texts, seed=0) -> list[int]:
    """Hand-built expectation (checks ``prompt``): <img> + <IMG_CONTEXT> * 4 * num_tiles + </img> per image."""
    ip = make_processor().image_processor
    ids = []
    for i, n in enumerate(texts):
        ids += word_ids(n, 7 * i + seed)
        if i < len(images):
            tiles = ip.get_number_of_image_patches(*images[i], {"crop_to_patches": True})
            ids += [START_ID] + [IMAGE_TOKEN_ID] * (IMAGE_SEQ_LENGTH * tiles) + [END_ID]
    return ids
