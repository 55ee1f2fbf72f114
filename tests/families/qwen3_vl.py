"""Tiny offline Qwen3-VL (model_type ``qwen3_vl``): random weights, the real ``Qwen3VLProcessor`` for the prompt.

* ``build()`` -> ``Qwen3VLForConditionalGeneration`` (2 decoder layers, 4 heads / 2 KV heads, head_dim 16,
  vocab 256, 2-block vision tower with patch 16, merge 2, deepstack on vision blocks 0 and 1).
* ``make_processor()`` -> the real ``Qwen3VLProcessor`` around a word-level tokenizer (built with ``tokenizers``),
  the real PIL image processor ``Qwen2VLImageProcessorPil`` (patch 16, the Qwen3-VL setting) and a stand-in
  video processor (transformers' video processors need torchvision, which is not installed): the stand-in only
  patchifies the frames it is given and returns ``video_grid_thw`` and ``video_metadata``; the text expansion of
  videos (timestamps, per-frame delimiters) is the real ``Qwen3VLProcessor.replace_video_token``.
* ``prompt(images, texts)`` / ``video_prompt(media, texts)`` -> batch-1 model inputs.

Token ids: 0 <pad>, 1 <unk>, 2-11 digits, 12 '<', 13 '>', 14 '.', 15 'seconds', 16-247 words 'aa'..'ix',
250 <|image_pad|>, 251 <|video_pad|>, 252 <|vision_start|>, 253 <|vision_end|>, 254 <|im_start|>, 255 <|im_end|>.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

IMAGE, VIDEO, VSTART, VEND = 250, 251, 252, 253
PATCH, MERGE, TPATCH = 16, 2, 2
FPS = 2.0
N_WORDS = 232


def build(attn_implementation: str = "sdpa"):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=254,
                         eos_token_id=255, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=TPATCH, out_hidden_size=64,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    cfg._attn_implementation = attn_implementation
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>"] + [str(d) for d in range(10)] + ["<", ">", ".", "seconds"]
    words += [_word(i) for i in range(N_WORDS)] + ["<r248>", "<r249>"]
    vocab = {w: i for i, w in enumerate(words)}
    specials = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>"]
    vocab.update({t: 250 + i for i, t in enumerate(specials)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.add_special_tokens(specials)  # never split, matched before pre-tokenization
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Punctuation("isolated"),
                                                pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
                              "im_start_token": "<|im_start|>"})


def _patchify(frames: np.ndarray, merge: int) -> tuple[torch.Tensor, list[int]]:
    """(T, H, W, C) floats -> (t*h*w, C*TPATCH*PATCH*PATCH) in the Qwen patch order (merge windows contiguous)."""
    if len(frames) % TPATCH:
        frames = np.concatenate([frames, np.repeat(frames[-1:], TPATCH - len(frames) % TPATCH, 0)])
    T, H, W, C = frames.shape
    t, h, w = T // TPATCH, H // PATCH, W // PATCH
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # T C H W
    x = x.reshape(t, TPATCH, C, h // merge, merge, PATCH, w // merge, merge, PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, C * TPATCH * PATCH * PATCH).float(), [t, h, w]


def _video_processor_class():
    from transformers.feature_extraction_utils import BatchFeature
    from transformers.video_processing_utils import VideoProcessorMixin
    from transformers.video_utils import VideoMetadata

    class StandInVideoProcessor(VideoProcessorMixin):
        """Stand-in for Qwen3VLVideoProcessor (needs torchvision): no frame sampling, no resize; frames must be
        multiples of 32 px. Returns what Qwen3VLProcessor.replace_video_token reads."""

        merge_size, temporal_patch_size, patch_size = MERGE, TPATCH, PATCH
        model_input_names = ["pixel_values_videos", "video_grid_thw"]

        def __call__(self, videos, **kwargs):
            pix, grids, metas = [], [], []
            for v in videos:
                v = np.asarray(v, dtype=np.float32) / 127.5 - 1.0  # mean/std 0.5 as in Qwen3-VL
                p, grid = _patchify(v, MERGE)
                pix.append(p)
                grids.append(grid)
                metas.append(VideoMetadata(total_num_frames=len(v), fps=FPS, height=v.shape[1], width=v.shape[2],
                                           frames_indices=list(range(len(v)))))
            return BatchFeature({"pixel_values_videos": torch.cat(pix), "video_grid_thw": torch.tensor(grids),
                                 "video_metadata": metas})

    return StandInVideoProcessor


@functools.cache
def make_processor():
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TPATCH,
                                  size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 64},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)

    class TinyQwen3VLProcessor(Qwen3VLProcessor):
        """The real processor; only its class check accepts the stand-in video processor (without torchvision
        transformers cannot even resolve ``VideoProcessorMixin`` for that check)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    return TinyQwen3VLProcessor(image_processor=ip, tokenizer=_tokenizer(), video_processor=_video_processor_class()())



def _word(i):
    return chr(97 + i // 26) + chr(97 + i % 26)  # "aa", "ab", ...: no digits (the pre-tokenizer splits digits)


def _words(n, start):
    return [_word((start + i) % N_WORDS) for i in range(n)]


def _image(hw, rng):
    from PIL import Image

    h, w = hw
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def video_prompt(media: list, texts: list[int], seed: int = 0) -> dict:
    """One row: ``texts[i]`` word tokens before ``media[i]`` and after the last. ``media[i]``: ``(h, w)`` an image
    of h x w pixels, or ``(t, h, w)`` a video of t frames (t in 1..8; frames are paired: t/2 rounded up temporal
    groups, each its own ``<t seconds><|vision_start|>...<|vision_end|>`` block). h, w: multiples of 32 (the
    processor's smart_resize rounds to 32 px); an image gives (h/32)*(w/32) tokens, a video frame group too."""
    rng = np.random.default_rng(seed)
    parts, images, videos = [], [], []
    for i, n in enumerate(texts):
        parts += _words(n, 7 * i + seed)
        if i == len(media):
            break
        m = media[i]
        if len(m) == 2:
            parts.append("<|vision_start|><|image_pad|><|vision_end|>")  # the chat template's image item
            images.append(_image(m, rng))
        else:
            t, h, w = m
            parts.append("<|vision_start|><|video_pad|><|vision_end|>")  # the chat template's video item
            videos.append(rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8))
    out = make_processor()(text=" ".join(parts), images=images or None, videos=videos or None, return_tensors="pt")
    out.pop("video_metadata", None)
    return dict(out)


def prompt(images: list, texts: list[int], seed: int = 0) -> dict:
    """``images``: list of (h, w) pixel sizes, multiples of 32, all different allowed (see ``video_prompt``)."""
    return video_prompt(list(images), texts, seed)
