"""Tiny offline Idefics3 (transformers 5.23 ``idefics3``): the same token structure, ids, tiling and model layout
as ``smolvlm.py`` (SmolVLM is Idefics3's successor; its processor's prompt strings are the same code).

Differences from smolvlm that matter here: ``Idefics3Processor`` has no video processor (builds without the
``images_only`` workaround) and no ``num2words`` requirement; its __init__ hardcodes the token strings
("<fake_token_around_image>", "<image>", "<end_of_utterance>", global tag "<global-img>") and calls
``tokenizer.add_special_tokens`` for the first three instead of reading tokenizer attributes.
"""

from __future__ import annotations

import functools

import torch

from . import smolvlm as s
from ._common import images as rand_images
from ._common import words

expected_ids = s.expected_ids


def build(attn_implementation: str = "sdpa"):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    torch.manual_seed(0)
    cfg = Idefics3Config(text_config=dict(s.TEXT), vision_config=dict(s.VISION), image_token_id=s.IMAGE_TOKEN_ID,
                         scale_factor=2, pad_token_id=0)
    cfg._attn_implementation = attn_implementation
    model = Idefics3ForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


@functools.cache
def make_processor():
    from transformers import Idefics3Processor
    from transformers.models.idefics3 import Idefics3ImageProcessorPil

    ip = Idefics3ImageProcessorPil(size={"longest_edge": s.LONGEST}, max_image_size={"longest_edge": s.TILE},
                                   do_image_splitting=True)
    return Idefics3Processor(image_processor=ip, tokenizer=s._tokenizer(), image_seq_len=s.IMAGE_SEQ_LEN)




def prompt(images, texts, seed=0, split=True) -> dict:
    """As ``smolvlm.prompt``."""
    assert len(texts) == len(images) + 1
    parts = []
    for i, n in enumerate(texts):
        parts += words(n, 7 * i + seed, s.N_WORDS)
        if i < len(images):
            parts.append("<image>")
    kw = {} if split else {"do_image_splitting": False}
    out = make_processor()(text=[" ".join(parts)], images=[rand_images(images, seed)] if images else None,
                           return_tensors="pt", **kw)
    keep = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
    return {k: v for k, v in out.items() if k in keep}
