"""Tiny offline Llama 4 (model_type ``llama4``): random weights, the real ``Llama4Processor`` for the prompt.

* ``build()`` -> ``Llama4ForConditionalGeneration``: 4 decoder layers (``no_rope_layer_interval=4``: layers 0-2
  RoPE + chunked attention with ``attention_chunk_size=16``, layer 3 NoPE + full attention + attention-temperature
  tuning with ``floor_scale=8``), MoE on layers 1 and 3 (``interleave_moe_layer_step=2``, 2 experts + shared
  expert), 4 heads / 2 KV heads, head_dim 16, vocab 256; a 2-layer vision tower on 28x28 tiles with patch 7 and
  pixel-shuffle 0.5 -> 4 ``<|patch|>`` tokens per tile (real: 336x336 tiles, patch 14 -> 144).
* ``make_processor()`` -> the real ``Llama4Processor`` (word-level tokenizer built with ``tokenizers``,
  ``patch_size=7``) around a STAND-IN image processor: ``Llama4ImageProcessor`` needs torchvision, which is not
  installed. The stand-in takes images whose sides are multiples of 28 px and cuts them into a (h/28) x (w/28)
  tile grid, adding a 28x28 global tile when there is more than one tile, i.e. what ``Llama4ImageProcessor``
  returns (``pixel_values`` tiles, ``aspect_ratios``) once it has chosen that grid; the real one chooses the grid
  itself (get_best_fit among the canvases of at most ``max_patches=16`` tiles) and resizes/pads the image to it.
  The token expansion is the real ``Llama4Processor.replace_image_token`` / ``_prompt_split_image``.
* ``prompt(images, texts)`` -> batch-1 model inputs.

Token ids: 0 <|finetune_right_pad_id|> (pad), 1 <unk>, 2-241 words 'aa'..'jf', 244 <|header_start|>,
245 <|header_end|>, 246 <|eot|>, 247 <|begin_of_text|>, 248 <|tile_x_separator|>, 249 <|tile_y_separator|>,
250 <|image_start|> (config.boi_token_index), 251 <|image_end|> (config.eoi_token_index), 252 <|patch|>
(config.image_token_index), 253 <|image|>, 255 <|end_of_text|>.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

TILE_X, TILE_Y, BOI, EOI, PATCH_TOK, IMAGE_TOK = 248, 249, 250, 251, 252, 253
TILE, PATCH = 28, 7
N_WORDS = 240


def build(attn_implementation: str = "sdpa"):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(0)
    cfg = Llama4Config(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=2,
                         attention_chunk_size=16, no_rope_layer_interval=4, floor_scale=8, attn_scale=0.1,
                         use_qk_norm=True, pad_token_id=0, bos_token_id=247, eos_token_id=255,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TILE, patch_size=PATCH, pixel_shuffle_ratio=0.5, projector_input_dim=64,
                           projector_output_dim=64, vision_output_dim=64,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
        boi_token_index=BOI, eoi_token_index=EOI, image_token_index=PATCH_TOK)
    cfg._attn_implementation = attn_implementation
    model = Llama4ForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def _word(i):
    return chr(97 + i // 26) + chr(97 + i % 26)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<|finetune_right_pad_id|>", "<unk>"] + [_word(i) for i in range(N_WORDS)])}
    specials = {"<|header_start|>": 244, "<|header_end|>": 245, "<|eot|>": 246, "<|begin_of_text|>": 247,
                "<|tile_x_separator|>": TILE_X, "<|tile_y_separator|>": TILE_Y, "<|image_start|>": BOI,
                "<|image_end|>": EOI, "<|patch|>": PATCH_TOK, "<|image|>": IMAGE_TOK, "<|end_of_text|>": 255}
    vocab.update(specials)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.add_special_tokens(list(specials))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<|finetune_right_pad_id|>",
                                   bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def _image_processor():
    from transformers.feature_extraction_utils import BatchFeature
    from transformers.image_processing_base import ImageProcessingMixin

    class StandInLlama4ImageProcessor(ImageProcessingMixin):
        """Tiles an image whose sides are multiples of TILE into its (h/TILE, w/TILE) grid (+ global tile)."""

        model_input_names = ["pixel_values"]

        def __call__(self, images, **kwargs):
            tiles, ratios = [], []
            for img in images:
                x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # C H W
                rh, rw = x.shape[1] // TILE, x.shape[2] // TILE
                grid = x[:, : rh * TILE, : rw * TILE].reshape(3, rh, TILE, rw, TILE).permute(1, 3, 0, 2, 4)
                tiles.append(grid.reshape(rh * rw, 3, TILE, TILE))
                if rh * rw > 1:  # global tile: the whole image at tile size
                    tiles.append(torch.nn.functional.interpolate(x[None], size=(TILE, TILE), mode="area"))
                ratios.append([rh, rw])
            return BatchFeature({"pixel_values": torch.cat(tiles), "aspect_ratios": torch.tensor(ratios)})

    return StandInLlama4ImageProcessor()


@functools.cache
def make_processor():
    from transformers import Llama4Processor

    return Llama4Processor(image_processor=_image_processor(), tokenizer=_tokenizer(), patch_size=PATCH,
                           pixel_shuffle_ratio=0.5)



def prompt(images: list, texts: list[int], seed: int = 0) -> dict:
    """One row: ``texts[i]`` word tokens before image i and after the last. ``images``: list of (rows, cols) tile
    grids (each 1..4); an image of r x c tiles (r*c > 1) gives ``<|image_start|>``, per tile row: (c tiles of 4
    ``<|patch|>`` separated by ``<|tile_x_separator|>``) + ``<|tile_y_separator|>``, then ``<|image|>`` + 4
    ``<|patch|>`` (the global tile) + ``<|image_end|>``; a (1, 1) image gives ``<|image_start|><|image|>`` + 4
    ``<|patch|>`` + ``<|image_end|>``. Tiles are fixed-size, so images differ by their tile grids."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    parts, pics = [], []
    for i, n in enumerate(texts):
        parts += [_word((7 * i + seed + j) % N_WORDS) for j in range(n)]
        if i == len(images):
            break
        parts.append("<|image|>")  # the chat template's image item
        rh, rw = images[i]
        pics.append(Image.fromarray(rng.integers(0, 256, (rh * TILE, rw * TILE, 3), dtype=np.uint8)))
    out = make_processor()(text=" ".join(parts), images=pics or None, return_tensors="pt")
    return dict(out)
