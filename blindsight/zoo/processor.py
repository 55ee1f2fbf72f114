"""A word-level processor for the shipped shapes model: text and images in, Qwen2-VL inputs out.

transformers' ``Qwen2VLProcessor`` cannot be built on this project's machines (its video processor needs
torchvision, which has no build for the pinned CPU torch), so this class composes the two parts that work:
a ``PreTrainedTokenizerFast`` over a word-level vocabulary and transformers' ``Qwen2VLImageProcessorPil``
(Qwen2-VL's own patch layout). It follows the processor conventions: ``__call__(text=[...], images=[...],
return_tensors="pt")`` returns ``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw`` and
``mm_token_type_ids``; ``save_pretrained`` / ``from_pretrained`` use a directory. Each image marker in the
text (``<|vision_start|><|image_pad|><|vision_end|>``, or ``<image>``) expands to one placeholder per merged
patch, as Qwen2-VL's processor does.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import BatchFeature, PreTrainedTokenizerFast

__all__ = ["ShapesProcessor", "SPECIAL_TOKENS", "PROCESSOR_FILE"]

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<|video_pad|>"]
PROCESSOR_FILE = "blindsight_processor.json"  # marks a directory whose processor is this class
IMAGE_TEXT = "<|vision_start|><|image_pad|><|vision_end|>"


def _image_processor(size: int, patch_size: int, merge_size: int, temporal_patch_size: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = size * size  # images are resized to exactly this many pixels (square images keep their size)
    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge_size,
                                    temporal_patch_size=temporal_patch_size,
                                    size={"shortest_edge": pixels, "longest_edge": pixels})


class ShapesProcessor:
    """Word-level tokenizer + Qwen2-VL image processor. Build with :meth:`build`, load with :meth:`from_pretrained`."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, image_processor, image_size: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_size = image_size
        self.image_token = "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.merge = image_processor.merge_size

    @classmethod
    def build(cls, words: list[str], image_size: int, patch_size: int, merge_size: int = 2,
              temporal_patch_size: int = 2):
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + [w for w in words if w not in SPECIAL_TOKENS])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                            eos_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[3:])
        return cls(tokenizer, _image_processor(image_size, patch_size, merge_size, temporal_patch_size), image_size)

    def token_ids(self) -> dict:
        """The special ids a Qwen2-VL config needs."""
        ids = self.tokenizer.convert_tokens_to_ids
        return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                    vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                    pad_token_id=ids("<pad>"), eos_token_id=ids("<|endoftext|>"))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        with open(os.path.join(path, PROCESSOR_FILE), "w") as f:
            json.dump({"processor_class": "blindsight.zoo.ShapesProcessor", "image_size": self.image_size}, f, indent=1)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ShapesProcessor:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        marker = os.path.join(path, PROCESSOR_FILE)
        if not os.path.isfile(marker):
            raise FileNotFoundError(f"{path}: no {PROCESSOR_FILE}; not a directory saved by "
                                    "ShapesProcessor.save_pretrained")
        with open(marker) as f:
            meta = json.load(f)
        return cls(PreTrainedTokenizerFast.from_pretrained(path), Qwen2VLImageProcessorPil.from_pretrained(path),
                   int(meta["image_size"]))

    def __call__(self, text: list[str] | str, images=None, return_tensors: str = "pt", **_) -> BatchFeature:
        """Model inputs for a batch of prompts; images in prompt order, all prompts' images in one list."""
        texts = [text] if isinstance(text, str) else list(text)
        texts = [t.replace("<image>", IMAGE_TEXT) for t in texts]
        out = {}
        grids = torch.zeros(0, 3, dtype=torch.long)
        if images:
            out = dict(self.image_processor(images=list(images), return_tensors="pt"))
            grids = out["image_grid_thw"]
        n_markers = sum(t.count(IMAGE_TEXT) for t in texts)
        if n_markers != len(grids):
            raise ValueError(f"the text has {n_markers} image markers but {len(grids)} images were given")
        per_image = (grids.prod(-1) // self.merge ** 2).tolist()
        expanded, k = [], 0
        for t in texts:  # one placeholder per merged patch, as Qwen2-VL's processor does
            parts = t.split("<|image_pad|>")
            s = parts[0]
            for p in parts[1:]:
                s += " " + " ".join(["<|image_pad|>"] * per_image[k]) + " " + p
                k += 1
            expanded.append(s.replace("<|vision_start|>", " <|vision_start|> ")
                            .replace("<|vision_end|>", " <|vision_end|> "))
        enc = self.tokenizer(expanded, padding=True, return_tensors="pt")
        if (enc["input_ids"] == self.tokenizer.unk_token_id).any():
            unknown = sorted({w for t in expanded for w in t.split() if w not in self.tokenizer.get_vocab()})
            raise ValueError(f"words outside the vocabulary: {unknown[:10]}")
        out.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   mm_token_type_ids=(enc["input_ids"] == self.image_token_id).long())
        return BatchFeature(out, tensor_type=return_tensors)

    def batch_decode(self, ids, **kw):
        return self.tokenizer.batch_decode(ids, **kw)
