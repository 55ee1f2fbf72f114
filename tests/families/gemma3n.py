"""Tiny offline Gemma 3n (model_type ``gemma3n``): random weights, the real ``Gemma3nProcessor`` for the prompt.

* ``build()`` -> ``Gemma3nForConditionalGeneration``: 4 decoder layers (sliding, full, sliding, full; the last 2
  share the KV of layers 0 and 1: ``num_kv_shared_layers=2``), 4 heads / 2 KV heads, head_dim 16, sliding window 8,
  vocab 256, AltUp/LAuReL/per-layer inputs as in the real model, a 1-block audio tower (the real Conformer classes).
  The vision tower of Gemma 3n is a timm MobileNetV5 (``TimmWrapperModel``); timm is not installed (and needs
  torchvision), so ``build()`` puts a STAND-IN in its place: a strided conv whose output has the timm wrapper's
  shape ``(B, vision hidden, 2, 2)`` -> 4 soft tokens per image (real: 768x768 px -> 16x16 = 256). Everything
  around it (``get_image_features``, ``embed_vision``, the placeholder scatter) is the real code.
* ``make_processor()`` -> the real ``Gemma3nProcessor`` (word-level tokenizer built with ``tokenizers``, the real PIL
  ``SiglipImageProcessorPil`` at 32x32, the real ``Gemma3nAudioFeatureExtractor``), ``image_seq_length=4``.
* ``prompt(images, texts)`` -> batch-1 model inputs.

Token ids: 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>, 4 "\\n\\n", 5-188 words 'aa'..'hb', 189 <start_of_turn>,
190 <start_of_image>, 191 <start_of_audio>; ids 192-223 are the vision "hard token" range (embed_vision,
vocab_offset 192): 192 <end_of_image>, 193 <image_soft_token>; ids 224-255 the audio range (embed_audio,
vocab_offset 224): 224 <end_of_audio>, 225 <audio_soft_token>. (Real: boi 255999, eoi 262144, image 262145,
boa 256000, eoa 262272, audio 262273, vocab_size_per_layer_input 262144, "\\n\\n" 108.)
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch

BOI, EOI, IMAGE, BOA, EOA, AUDIO, NL2 = 190, 192, 193, 191, 224, 225, 4
TOKENS_PER_IMAGE = 4
IMAGE_PX = 32
N_WORDS = 184


class StandInVisionTower(torch.nn.Module):
    """Stand-in for the timm MobileNetV5 ``TimmWrapperModel`` (timm is not installed): same call and output
    contract as Gemma3nModel.get_image_features uses: ``(pixel_values, do_pooling=False, return_dict=True)`` ->
    ``.last_hidden_state`` of shape ``(B, vision_config.hidden_size, s, s)`` with s*s soft tokens."""

    def __init__(self, hidden_size: int, side: int = 2):
        super().__init__()
        self.side = side
        self.conv = torch.nn.Conv2d(3, hidden_size, kernel_size=3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(side)

    def forward(self, pixel_values, do_pooling=False, return_dict=True, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        x = self.pool(torch.nn.functional.gelu(self.conv(pixel_values)))
        return BaseModelOutputWithPooling(last_hidden_state=x)


@contextlib.contextmanager
def _vision_stand_in():
    from transformers.models.gemma3n import modeling_gemma3n
    from transformers.models.gemma3n.configuration_gemma3n import Gemma3nVisionConfig

    real = modeling_gemma3n.AutoModel

    class AutoModelShim:
        @staticmethod
        def from_config(config, **kwargs):
            if isinstance(config, Gemma3nVisionConfig):
                return StandInVisionTower(config.hidden_size)
            return real.from_config(config, **kwargs)

    modeling_gemma3n.AutoModel = AutoModelShim
    try:
        yield
    finally:
        modeling_gemma3n.AutoModel = real


def build(attn_implementation: str = "sdpa"):
    from transformers import Gemma3nConfig, Gemma3nForConditionalGeneration
    from transformers.models.gemma3n.configuration_gemma3n import (
        Gemma3nAudioConfig,
        Gemma3nTextConfig,
        Gemma3nVisionConfig,
    )

    torch.manual_seed(0)
    text = Gemma3nTextConfig(
        vocab_size=256, vocab_size_per_layer_input=192, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size_per_layer_input=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sliding_window=8, num_kv_shared_layers=2, laurel_rank=8, altup_num_inputs=4,
        activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0], pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vision = Gemma3nVisionConfig(hidden_size=32, vocab_size=32, vocab_offset=192, num_labels=0)
    audio = Gemma3nAudioConfig(vocab_size=32, vocab_offset=224, input_feat_size=16, hidden_size=32,
                               conf_num_hidden_layers=1, conf_num_attention_heads=2, sscp_conv_channel_size=[8, 4])
    cfg = Gemma3nConfig(text_config=text, vision_config=vision, audio_config=audio,
                        vision_soft_tokens_per_image=TOKENS_PER_IMAGE, audio_soft_tokens_per_image=8,
                        boi_token_id=BOI, eoi_token_id=EOI, image_token_id=IMAGE, boa_token_id=BOA,
                        eoa_token_id=EOA, audio_token_id=AUDIO)
    cfg._attn_implementation = attn_implementation
    with _vision_stand_in():
        model = Gemma3nForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def _word(i):
    return chr(97 + i // 26) + chr(97 + i % 26)


def _tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "\n\n"] + [_word(i) for i in range(N_WORDS)]
    vocab = {w: i for i, w in enumerate(words)}
    specials = {"<start_of_turn>": 189, "<start_of_image>": BOI, "<start_of_audio>": BOA,
                "<end_of_image>": EOI, "<image_soft_token>": IMAGE, "<end_of_audio>": EOA, "<audio_soft_token>": AUDIO}
    vocab.update(specials)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.add_special_tokens(list(specials))
    # Gemma's SentencePiece vocab has "\n\n" as one token (id 108); keep it one token here too
    tk.add_tokens([AddedToken("\n\n", normalized=False, special=False)])
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>", "audio_token": "<audio_soft_token>",
                              "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"})


@functools.cache
def make_processor():
    from transformers import Gemma3nProcessor
    from transformers.models.gemma3n.feature_extraction_gemma3n import Gemma3nAudioFeatureExtractor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(feature_size=16),
                            image_processor=SiglipImageProcessorPil(size={"height": IMAGE_PX, "width": IMAGE_PX}),
                            tokenizer=_tokenizer(), image_seq_length=TOKENS_PER_IMAGE, audio_seq_length=8)



def prompt(images: list, texts: list[int], seed: int = 0) -> dict:
    """One row: ``<bos>``, then ``texts[i]`` word tokens before image i and after the last. ``images``: list of
    (h, w) pixel sizes of the source images (any; the processor resizes every image to 32x32, so every image gives
    the same ``\\n\\n <start_of_image> 4 x <image_soft_token> <end_of_image> \\n\\n`` block: Gemma 3n has a fixed
    token count per image, no tiling)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    parts, pics = ["<bos>"], []
    for i, n in enumerate(texts):
        parts += [_word((7 * i + seed + j) % N_WORDS) for j in range(n)]
        if i == len(images):
            break
        parts.append("<image_soft_token>")  # the chat template's image item
        pics.append(Image.fromarray(rng.integers(0, 256, (*images[i], 3), dtype=np.uint8)))
    out = make_processor()(text=" ".join(parts), images=pics or None, return_tensors="pt")
    return dict(out)
