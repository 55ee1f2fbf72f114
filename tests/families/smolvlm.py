"""Tiny offline SmolVLM (transformers 5.23 ``smolvlm``): Llama text decoder + SigLIP-like tower + pixel-shuffle
connector; images split into a rows x cols grid of tiles plus a global (downscaled) tile.

Ids (word-level tokenizer): 0 <pad>, 1 <s>, 2 </s>, 3 <unk>, 4..193 text words ``w{i}``, 194 "\\n", 195 "\\n\\n",
196 <fake_token_around_image>, 197 <image> (config.image_token_id, the only id the model reads), 198 <global-img>,
199 <end_of_utterance>, 200 + 6*(r-1) + (c-1) = <row_r_col_c> for r, c in 1..6.

Vision: tiles of 32x32 (``max_image_size.longest_edge``), patch 8 -> 16 patches, pixel shuffle x2 -> 4 <image> per
tile (``image_seq_len = (32 // 8) ** 2 / 2 ** 2 = 4``). With splitting on (default), each image is resized so its
longest edge is 96 (``size.longest_edge``), then up to multiples of 32 and cut into rows x cols tiles (1..3 each)
+ the global tile: (96, 96) -> 3x3, (64, 96) -> 2x3, (96, 32) -> 3x1, (32, 64) -> resized to (48, 96) -> 2x3.
With ``split=False`` every image is one 32x32 tile (rows = cols = 0: the "single image" form).
"""

from __future__ import annotations

import functools

import torch

from ._common import images as rand_images
from ._common import images_only, word_ids, word_tokenizer, words

N_WORDS = 190
TEXT = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
NL, NL2, FAKE_ID, IMAGE_TOKEN_ID, GLOBAL_ID, EOU_ID = 194, 195, 196, 197, 198, 199
TILE, IMAGE_SEQ_LEN, LONGEST = 32, 4, 96


def row_col_id(r, c):
    return 200 + 6 * (r - 1) + (c - 1)


def build(attn_implementation: str = "sdpa"):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    torch.manual_seed(0)
    cfg = SmolVLMConfig(text_config=dict(TEXT), vision_config=dict(VISION), image_token_id=IMAGE_TOKEN_ID,
                        scale_factor=2, pad_token_id=0)
    cfg._attn_implementation = attn_implementation
    model = SmolVLMForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def _tokenizer():
    specials = {"<fake_token_around_image>": FAKE_ID, "<image>": IMAGE_TOKEN_ID, "<global-img>": GLOBAL_ID,
                "<end_of_utterance>": EOU_ID}
    specials.update({f"<row_{r}_col_{c}>": row_col_id(r, c) for r in range(1, 7) for c in range(1, 7)})
    # SmolVLMProcessor reads tokenizer.fake_image_token / image_token / global_image_token /
    # end_of_utterance_token when present (getattr with these defaults)
    return word_tokenizer(list(specials), specials, newline_ids=(NL, NL2), n_words=N_WORDS,
                          extra_special_tokens={"fake_image_token": "<fake_token_around_image>",
                                                "image_token": "<image>", "global_image_token": "<global-img>",
                                                "end_of_utterance_token": "<end_of_utterance>"})


@functools.cache
def make_processor():
    """The real ``SmolVLMProcessor`` (SmolVLMImageProcessorPil + word-level tokenizer), offline, without a video
    processor (``_common.images_only``). Its __init__ raises ImportError when the ``num2words`` package is missing
    (used for video prompts only); it is not installed here, so a stand-in is set for the duration of __init__."""
    from transformers import SmolVLMProcessor
    from transformers.models.smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm import processing_smolvlm as ps

    ip = SmolVLMImageProcessorPil(size={"longest_edge": LONGEST}, max_image_size={"longest_edge": TILE},
                                  do_image_splitting=True)
    saved = ps.num2words
    if saved is None:
        ps.num2words = str  # only used by replace_video_token
    try:
        with images_only():
            return SmolVLMProcessor(image_processor=ip, tokenizer=_tokenizer(), video_processor=None,
                                    image_seq_len=IMAGE_SEQ_LEN)
    finally:
        ps.num2words = saved




def prompt(images, texts, seed=0, split=True) -> dict:
    """``images``: list of (height, width) pixel sizes (random RGB content); ``texts[i]`` words before image i,
    ``texts[len(images)]`` after the last; ``split``: the image processor's ``do_image_splitting`` (one flag for the
    whole call, as in the real processor). Returns input_ids, attention_mask, pixel_values
    (1, n_tiles_total, 3, 32, 32) and pixel_attention_mask (1, n_tiles_total, 32, 32)."""
    assert len(texts) == len(images) + 1
    parts = []
    for i, n in enumerate(texts):
        parts += words(n, 7 * i + seed, N_WORDS)
        if i < len(images):
            parts.append("<image>")
    kw = {} if split else {"do_image_splitting": False}
    out = make_processor()(text=[" ".join(parts)], images=[rand_images(images, seed)] if images else None,
                           return_tensors="pt", **kw)
    keep = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
    return {k: v for k, v in out.items() if k in keep}


def grid(height, width, split=True):
    """(rows, cols) of tiles the image processor cuts (0, 0 = not split)."""
    if not split:
        return 0, 0
    _, rows, cols = make_processor().image_processor.get_number_of_image_patches(
        height, width, {"size": {"longest_edge": LONGEST}, "max_image_size": {"longest_edge": TILE}})
    return rows, cols


def image_ids(rows, cols) -> list[int]:
    """Hand-built token run of one image (after processing_smolvlm.get_image_prompt_string, tokenized)."""
    glob = [FAKE_ID, GLOBAL_ID] + [IMAGE_TOKEN_ID] * IMAGE_SEQ_LEN + [FAKE_ID]
    if rows == cols == 0:
        return glob
    ids = []
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            ids += [FAKE_ID, row_col_id(r, c)] + [IMAGE_TOKEN_ID] * IMAGE_SEQ_LEN
        ids.append(NL)
    ids[-1] = NL2  # the last row's "\n" and the "\n" before the global tile are one token
    return ids + glob


def expected_ids(images, texts, seed=0, split=True) -> list[int]:
    ids = []
    for i, n in enumerate(texts):
        ids += word_ids(n, 7 * i + seed, N_WORDS)
        if i < len(images):
            ids += image_ids(*grid(*images[i], split=split))
    return ids
