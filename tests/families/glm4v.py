"""Tiny offline GLM-4.1V (model_type ``glm4v``): random weights, the real ``Glm4vProcessor`` for the prompt.

* ``build()`` -> ``Glm4vForConditionalGeneration`` (2 decoder layers, 4 heads / 2 KV heads, head_dim 16 with
  partial rotary 0.5, vocab 256, 2-block vision tower with patch 14, merge 2).
* ``make_processor()`` -> the real ``Glm4vProcessor`` around a word-level tokenizer (built with ``tokenizers``), the
  real PIL image processor ``Glm4vImageProcessorPil`` and a stand-in video processor (transformers' video processors
  need torchvision, which is not installed): the stand-in only patchifies the frames it is given and returns
  ``video_grid_thw`` and ``video_metadata``; the text expansion of videos (per-frame image blocks, timestamps) is
  the real ``Glm4vProcessor.replace_video_token``.
* ``prompt(images, texts)`` / ``video_prompt(media, texts)`` -> batch-1 model inputs.

Token ids: 0 <pad>, 1 <unk>, 2-11 digits, 12-243 words 'aa'..'ix', 244 [gMASK], 245 <sop>,
246 <|begin_of_image|>, 247 <|end_of_image|>, 248 <|begin_of_video|>, 249 <|end_of_video|>, 250 <|image|>,
251 <|video|>, 252 <|user|>, 253 <|assistant|>, 254 <|endoftext|>, 255 <|system|>.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

BOI, EOI, BOV, EOV, IMAGE, VIDEO = 246, 247, 248, 249, 250, 251
PATCH, MERGE, TPATCH = 14, 2, 2
FPS = 2.0
N_WORDS = 232


def build(attn_implementation: str = "sdpa"):
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    torch.manual_seed(0)
    cfg = Glm4vConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1],
                                          "partial_rotary_factor": 0.5}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                           image_size=56, spatial_merge_size=MERGE, temporal_patch_size=TPATCH, out_hidden_size=64),
        image_token_id=IMAGE, video_token_id=VIDEO, image_start_token_id=BOI, image_end_token_id=EOI,
        video_start_token_id=BOV, video_end_token_id=EOV)
    cfg._attn_implementation = attn_implementation
    model = Glm4vForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def _word(i):
    return chr(97 + i // 26) + chr(97 + i % 26)  # "aa", "ab", ...: no digits (the pre-tokenizer splits digits)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>"] + [str(d) for d in range(10)] + [_word(i) for i in range(N_WORDS)]
    vocab = {w: i for i, w in enumerate(words)}
    specials = ["[gMASK]", "<sop>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                "<|end_of_video|>", "<|image|>", "<|video|>", "<|user|>", "<|assistant|>", "<|endoftext|>",
                "<|system|>"]
    vocab.update({t: 244 + i for i, t in enumerate(specials)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.add_special_tokens(specials)  # never split, matched before pre-tokenization
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image|>", "video_token": "<|video|>"})


def _patchify(frames: np.ndarray) -> tuple[torch.Tensor, list[int]]:
    """(T, H, W, C) floats -> (t*h*w, C*TPATCH*PATCH*PATCH) with each merge window's patches contiguous."""
    if len(frames) % TPATCH:
        frames = np.concatenate([frames, np.repeat(frames[-1:], TPATCH - len(frames) % TPATCH, 0)])
    T, H, W, C = frames.shape
    t, h, w = T // TPATCH, H // PATCH, W // PATCH
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # T C H W
    x = x.reshape(t, TPATCH, C, h // MERGE, MERGE, PATCH, w // MERGE, MERGE, PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, C * TPATCH * PATCH * PATCH).float(), [t, h, w]


def _video_processor_class():
    from transformers.feature_extraction_utils import BatchFeature
    from transformers.video_processing_utils import VideoProcessorMixin
    from transformers.video_utils import VideoMetadata

    class StandInVideoProcessor(VideoProcessorMixin):
        """Stand-in for Glm4vVideoProcessor (needs torchvision): no frame sampling, no resize; frames must be
        multiples of 28 px. Returns what Glm4vProcessor.replace_video_token reads."""

        merge_size, temporal_patch_size, patch_size = MERGE, TPATCH, PATCH
        model_input_names = ["pixel_values_videos", "video_grid_thw"]

        def __call__(self, videos, **kwargs):
            pix, grids, metas = [], [], []
            for v in videos:
                v = np.asarray(v, dtype=np.float32) / 255.0
                p, grid = _patchify(v)
                pix.append(p)
                grids.append(grid)
                metas.append(VideoMetadata(total_num_frames=len(v), fps=FPS, height=v.shape[1], width=v.shape[2],
                                           frames_indices=list(range(len(v)))))
            return BatchFeature({"pixel_values_videos": torch.cat(pix), "video_grid_thw": torch.tensor(grids),
                                 "video_metadata": metas})

    return StandInVideoProcessor


@functools.cache
def make_processor():
    from transformers import Glm4vProcessor
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    class TinyGlm4vProcessor(Glm4vProcessor):
        """The real processor; only its class check accepts the stand-in video processor (without torchvision
        transformers cannot even resolve ``VideoProcessorMixin`` for that check)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    ip = Glm4vImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TPATCH,
                                size={"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 64})
    return TinyGlm4vProcessor(image_processor=ip, tokenizer=_tokenizer(), video_processor=_video_processor_class()())



def _words(n, start):
    return [_word((start + i) % N_WORDS) for i in range(n)]


def video_prompt(media: list, texts: list[int], seed: int = 0) -> dict:
    """One row: ``texts[i]`` word tokens before ``media[i]`` and after the last. ``media[i]``: ``(h, w)`` an image
    of h x w pixels, or ``(t, h, w)`` a video of t frames (t in 1..8; frames are paired: t/2 rounded up temporal
    groups, each its own ``<|begin_of_image|>...<|end_of_image|>`` block followed by its timestamp). h, w:
    multiples of 28; an image gives (h/28)*(w/28) tokens, a video frame group too.

    NOTE transformers 5.23 cannot run a prompt that mixes images and videos (Glm4vModel.get_placeholder_mask
    counts video-frame tokens as image tokens): see REPORT_A.md."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    parts, images, videos = [], [], []
    for i, n in enumerate(texts):
        parts += _words(n, 7 * i + seed)
        if i == len(media):
            break
        m = media[i]
        if len(m) == 2:
            parts.append("<|begin_of_image|><|image|><|end_of_image|>")  # the chat template's image item
            images.append(Image.fromarray(rng.integers(0, 256, (*m, 3), dtype=np.uint8)))
        else:
            parts.append("<|begin_of_video|><|video|><|end_of_video|>")  # the chat template's video item
            videos.append(rng.integers(0, 256, (*m, 3), dtype=np.uint8))
    out = make_processor()(text=" ".join(parts), images=images or None, videos=videos or None, return_tensors="pt")
    out.pop("video_metadata", None)
    return dict(out)


def prompt(images: list, texts: list[int], seed: int = 0) -> dict:
    """``images``: list of (h, w) pixel sizes, multiples of 28, all different allowed (see ``video_prompt``)."""
    return video_prompt(list(images), texts, seed)
