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

__all__ = ["UnsupportedAttentionError", "not_sdpa_message", "language_model_layer", "one_layer_attention", "is_tower",
           "model_config", "text_config",
           "text_config_key", "template_ids", "video_token_ids", "config_names_template", "config_placeholder_ids",
           "processor_template_ids", "language_model_shape", "language_model", "IMAGE_TEXT", "image_text",
           "TEMPLATE_MODEL_TYPES", "CONFIG_TEMPLATE_FIELDS", "CONFIG_VIDEO_FIELDS",
           "PROCESSOR_TEMPLATE_TOKENS", "PROCESSOR_MODEL_TYPES"]

# where each family's config names its image ids: model type -> (open, close, placeholder) config fields
CONFIG_TEMPLATE_FIELDS = {
    "qwen2_vl": (("vision_start_token_id",), ("vision_end_token_id",), ("image_token_id", "video_token_id")),
    "qwen2_5_vl": (("vision_start_token_id",), ("vision_end_token_id",), ("image_token_id", "video_token_id")),
    "qwen3_vl": (("vision_start_token_id",), ("vision_end_token_id",), ("image_token_id", "video_token_id")),
    "qwen3_vl_moe": (("vision_start_token_id",), ("vision_end_token_id",), ("image_token_id", "video_token_id")),
    "gemma3": (("boi_token_index",), ("eoi_token_index",), ("image_token_index",)),
    "gemma3n": (("boi_token_id",), ("eoi_token_id",), ("image_token_id",)),
    # a GLM-4V video's frames are images (``<|begin_of_image|>`` ... per frame): each frame is a segment
    "glm4v": (("image_start_token_id",), ("image_end_token_id",), ("image_token_id", "video_token_id")),
    "glm4v_moe": (("image_start_token_id",), ("image_end_token_id",), ("image_token_id", "video_token_id")),
    # Llama-4's tile separators and <|image|> lie inside the pair; the placeholder is <|patch|>
    "llama4": (("boi_token_index",), ("eoi_token_index",), ("image_token_index",)),
    "llava_onevision": ((), (), ("image_token_id", "video_token_id")),
}
TEMPLATE_MODEL_TYPES = tuple(CONFIG_TEMPLATE_FIELDS)  # model types whose config names every image id
# model type -> the config fields of its video placeholders (a GLM-4V video's frames use the image id)
CONFIG_VIDEO_FIELDS = {t: ("video_token_id",) for t in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")}

# families whose delimiters only the tokenizer knows: processor class -> (open, close, placeholder, final-part)
# processor attributes holding the token strings
PROCESSOR_TEMPLATE_TOKENS = {
    "InternVLProcessor": (("start_image_token",), ("end_image_token",), ("image_token",), ()),
    "PixtralProcessor": ((), ("image_end_token",), ("image_token", "image_break_token"), ()),
    "Idefics3Processor": (("fake_image_token",), ("fake_image_token",), ("image_token",), ("global_image_tag",)),
    "SmolVLMProcessor": (("fake_image_token",), ("fake_image_token",), ("image_token",), ("global_image_token",)),
}
# model type -> the processor class that knows its template
PROCESSOR_MODEL_TYPES = {"internvl": "InternVLProcessor", "mistral3": "PixtralProcessor",
                         "idefics3": "Idefics3Processor", "smolvlm": "SmolVLMProcessor"}

_LAYER = re.compile(r"(?:^|\.)layers[.\[](\d+)\]?\.self_attn$")
_VISION = re.compile(r"vision|visual|audio", re.IGNORECASE)  # towers that are not the language model
_TOWER_WORDS = {"vision", "visual", "audio"}


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

    Vision and audio modules (any path component mentioning vision/visual/audio) never match. Shared by the compiler
    pass (Dynamo's ``nn_module_stack`` paths) and calibration (``named_modules`` names).
    """
    m = _LAYER.search(path) if path and not _VISION.search(path) else None
    return int(m.group(1)) if m else None


def _words(name: str) -> set[str]:
    """The lower-case words of a class name or model type: ``SiglipVisionModel`` and ``siglip_vision_model`` ->
    {siglip, vision, model}; ``LlavaOnevisionModel`` -> {llava, onevision, model} (not a vision tower)."""
    return {w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)}


def is_tower(module) -> bool:
    """Whether a module is (inside) a vision or audio tower, by its class, its config's class or its config's
    model type having a vision/visual/audio word. Dynamo can compile a tower's forward as a graph of its own (a
    graph break, or a recompile under dynamic shapes): paths are then relative to the tower (``encoder.layers.0
    .self_attn``), with nothing in them that says vision."""
    config = getattr(module, "config", None)
    names = [type(module).__name__, type(config).__name__ if config is not None else "",
             str(getattr(config, "model_type", "") or "")]
    return any(_words(n) & _TOWER_WORDS for n in names)


def one_layer_attention(module) -> tuple[int, str] | None:
    """``(layer index, path of its attention module from module)`` when ``module`` runs exactly one language-model
    decoder layer's attention, else None: a decoder layer (its ``self_attn`` has an int ``layer_idx``; path
    ``"self_attn"``) or such an attention module itself (an ``...Attention`` class with an int ``layer_idx``; path
    ``""``); never a vision/audio class. Dynamo compiles such a module as a graph of its own when a graph break
    splits the decoder loop (Qwen3-VL's deepstack does) or a decoder layer (a hook that breaks the graph)."""
    attn = getattr(module, "self_attn", None)
    if attn is None and "attention" in _words(type(module).__name__):
        attn, path = module, ""
    else:
        path = "self_attn"
    index = getattr(attn, "layer_idx", None)
    if not isinstance(index, int) or _VISION.search(type(module).__name__) or _VISION.search(type(attn).__name__):
        return None
    return index, path


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


def config_names_template(config) -> bool:
    """Whether this config (or model) names every image id (:func:`template_ids` works on it)."""
    return getattr(model_config(config), "model_type", None) in CONFIG_TEMPLATE_FIELDS


def template_ids(config) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(image_open_ids, image_close_ids, image_token_ids)`` a VLM config (or a model) names; ValueError for a
    model type without built-in ids."""
    config = model_config(config)
    model_type = getattr(config, "model_type", None)
    if model_type in CONFIG_TEMPLATE_FIELDS:
        return tuple(tuple(int(getattr(config, f)) for f in fs) for fs in CONFIG_TEMPLATE_FIELDS[model_type])
    if model_type in PROCESSOR_MODEL_TYPES:
        raise ValueError(
            f"Template.from_config: a {model_type!r} config names only the image placeholder; its image delimiters "
            "are known to its processor: use Template.from_processor(processor) or Template.from_pretrained(model_dir)"
        )
    raise ValueError(
        f"Template.from_config: no built-in template for model_type={model_type!r} "
        f"(known: {', '.join(TEMPLATE_MODEL_TYPES + tuple(PROCESSOR_MODEL_TYPES))}). Build one by hand from the "
        "token ids its processor writes around one image, e.g. Template(image_open_ids=(start_id,), "
        "image_close_ids=(end_id,), image_token_ids=(placeholder_id,)); see the README's model table."
    )


def video_token_ids(config) -> tuple[int, ...]:
    """The video placeholder ids of a config whose family writes videos as pairs of video placeholders."""
    config = model_config(config)
    return tuple(int(getattr(config, f)) for f in CONFIG_VIDEO_FIELDS.get(getattr(config, "model_type", None), ()))


def config_placeholder_ids(config) -> tuple[int, ...]:
    """The image/video placeholder ids a config names (``image_token_id``, ``image_token_index``,
    ``video_token_id``), whatever its family: what a template for it must contain."""
    config = model_config(config)
    names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    return tuple(sorted({int(v) for n in names if isinstance(v := getattr(config, n, None), int)}))


def processor_template_ids(processor) -> tuple[tuple[int, ...], ...]:
    """``(open, close, placeholder, final-part)`` ids of a processor of a family in ``PROCESSOR_TEMPLATE_TOKENS``
    (its class or a base class), read from the token strings it holds and its tokenizer."""
    names = next((PROCESSOR_TEMPLATE_TOKENS[c.__name__] for c in type(processor).__mro__
                  if c.__name__ in PROCESSOR_TEMPLATE_TOKENS), None)
    if names is None:
        raise ValueError(
            f"Template.from_processor: no built-in template for {type(processor).__name__} (known: "
            f"{', '.join(PROCESSOR_TEMPLATE_TOKENS)}); for a family whose config names its image ids use "
            "Template.from_config(config), else build a Template by hand (see the README's model table)"
        )
    tokenizer = getattr(processor, "tokenizer", processor)
    unk = getattr(tokenizer, "unk_token_id", None)

    def token_id(attr: str) -> int:
        token = getattr(processor, attr, None)
        i = tokenizer.convert_tokens_to_ids(token) if isinstance(token, str) else None
        if not isinstance(i, int) or i == unk:
            raise ValueError(f"Template.from_processor: {type(processor).__name__}.{attr} = {token!r} is not a "
                             "token of its tokenizer")
        return i

    return tuple(tuple(token_id(a) for a in attrs) for attrs in names)


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


_LANGUAGE_MODEL_PATHS = ("model.language_model", "model.text_model", "language_model.model")


def language_model(model):
    """The language model (decoder stack) of a transformers VLM: ``model.model.language_model`` (most
    families), ``model.model.text_model`` (Idefics3, SmolVLM) or ``model.language_model.model`` (Llama-4)."""
    for path in _LANGUAGE_MODEL_PATHS:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise AttributeError(f"{type(model).__name__} has none of {', '.join(_LANGUAGE_MODEL_PATHS)}: not a VLM "
                         "BlindSight knows where to find the language model of")


# what each model's processor expands into one image (Qwen: the placeholder between its delimiters)
IMAGE_TEXT = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl_moe": "<|vision_start|><|image_pad|><|vision_end|>",
    "gemma3": "<start_of_image>",
    "glm4v": "<|begin_of_image|><|image|><|end_of_image|>",
    "glm4v_moe": "<|begin_of_image|><|image|><|end_of_image|>",
}  # the others: the processor's image_token, which it expands with the delimiters


def image_text(processor, model_type: str) -> str | None:
    """The text that stands for one image in a prompt for this processor, or None if it is not known."""
    return IMAGE_TEXT.get(model_type) or getattr(processor, "image_token", None)
