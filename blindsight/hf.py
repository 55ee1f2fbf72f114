"""What BlindSight knows about transformers: config fields, module paths, attention implementations.

Everything that reads a transformers config or model by name lives here, so that a new model family, or a
transformers release that moves a field, changes one module: the image token ids of each supported model type
(:func:`template_ids`), the language model's shape (:func:`language_model_shape`), which attention modules
belong to the language model (:func:`language_model_layer`, read from module paths by the compiler pass and by
calibration), where the language model sits in a VLM (:func:`language_model`), and what each processor writes
for one image (:func:`image_text`). It imports nothing of BlindSight.
"""

from __future__ import annotations

import re

__all__ = ["UnsupportedAttentionError", "not_sdpa_message", "language_model_layer", "model_config", "text_config",
           "text_config_key", "template_ids", "language_model_shape", "language_model", "IMAGE_TEXT", "image_text",
           "TEMPLATE_MODEL_TYPES"]

# model types whose image ids the config names (``template_ids``)
TEMPLATE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "gemma3")

_LAYER = re.compile(r"(?:^|\.)layers[.\[](\d+)\]?\.self_attn$")
_VISION = re.compile(r"vision|visual", re.IGNORECASE)


class UnsupportedAttentionError(RuntimeError):
    """The language model's attention does not go through scaled_dot_product_attention."""


def not_sdpa_message(module: str) -> str:
    return (
        f"the language model's attention ({module}, ...) does not call scaled_dot_product_attention, so "
        'BlindSight cannot use it. Load the model with attn_implementation="sdpa" '
        '(e.g. from_pretrained(..., attn_implementation="sdpa")).'
    )


def language_model_layer(path: str) -> int | None:
    """Decoder-layer index of a language-model attention module path (``...layers.7.self_attn``), else None.

    Vision modules (any path component mentioning vision/visual) never match. Shared by the compiler pass
    (Dynamo's ``nn_module_stack`` paths) and calibration (``named_modules`` names).
    """
    m = _LAYER.search(path) if path and not _VISION.search(path) else None
    return int(m.group(1)) if m else None


def model_config(config_or_model):
    """The config of a model (its ``.config``), or the config itself."""
    return getattr(config_or_model, "config", config_or_model)


def text_config(config):
    """The language model's config of a VLM config (``get_text_config()``), or a text-only config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def text_config_key(config) -> str | None:
    """The sub-config that holds the language model (``text_config``), or None for a text-only model."""
    subs = getattr(config, "sub_configs", {}) or {}
    return "text_config" if "text_config" in subs else None


def template_ids(config) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(image_open_ids, image_close_ids, image_token_ids)`` a VLM config (or a model) names; ValueError for a
    model type without built-in ids."""
    config = model_config(config)
    model_type = getattr(config, "model_type", None)
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        return ((config.vision_start_token_id,), (config.vision_end_token_id,),
                (config.image_token_id, config.video_token_id))
    if model_type == "gemma3":
        return (config.boi_token_index,), (config.eoi_token_index,), (config.image_token_index,)
    raise ValueError(
        f"Template.from_config: no built-in template for model_type={model_type!r} "
        f"(known: {', '.join(TEMPLATE_MODEL_TYPES)}). Build one by hand: "
        "Template(image_open_ids=(...), image_close_ids=(...), image_token_ids=(...))."
    )


def language_model_shape(config) -> dict:
    """``model_type``, ``num_layers``, ``num_heads``, ``num_kv_heads`` and ``head_dim`` of the language model of a
    transformers config (VLM or text-only) or model."""
    config = model_config(config)
    text = text_config(config)
    heads = text.num_attention_heads
    return dict(
        model_type=config.model_type,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
    )


def language_model(model):
    """The language model (decoder stack) of a transformers VLM: ``model.model.language_model``."""
    return model.model.language_model


# what each model's processor expands into one image (Qwen: the placeholder between its delimiters)
IMAGE_TEXT = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "gemma3": "<start_of_image>",
}


def image_text(processor, model_type: str) -> str | None:
    """The text that stands for one image in a prompt for this processor, or None if it is not known."""
    return IMAGE_TEXT.get(model_type) or getattr(processor, "image_token", None)
