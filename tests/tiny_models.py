"""Tiny random-weight VLMs from transformers configs (they build and run on CPU, offline) and multi-image prompts."""

from __future__ import annotations

import contextlib
import random
import re

import torch

from blindsight import BaseMask, Category, Layout, ModelInfo, Profile, Template, reference_mask

QWEN_TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, bos_token_id=254, eos_token_id=255, pad_token_id=0,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
QWEN_IDS = dict(image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)


def build(name: str, attn_implementation: str = "sdpa"):
    torch.manual_seed(0)
    if name == "qwen2_vl":
        from transformers import Qwen2VLConfig
        from transformers import Qwen2VLForConditionalGeneration as M

        cfg = Qwen2VLConfig(text_config=dict(QWEN_TEXT), vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2), **QWEN_IDS)
    elif name == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig
        from transformers import Qwen2_5_VLForConditionalGeneration as M

        cfg = Qwen2_5_VLConfig(text_config=dict(QWEN_TEXT), vision_config=dict(
            depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]), **QWEN_IDS)
    elif name == "gemma3":
        from transformers import Gemma3Config
        from transformers import Gemma3ForConditionalGeneration as M

        cfg = Gemma3Config(
            text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                             sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                             bos_token_id=2, eos_token_id=1, pad_token_id=0),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8),
            mm_tokens_per_image=4, image_token_index=250, boi_token_index=251, eoi_token_index=252)
    else:
        raise ValueError(name)
    cfg._attn_implementation = attn_implementation
    model = M(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def _text(n, start):
    return [10 + (start + i) % 200 for i in range(n)]


def prompt(name: str, images: list, texts: list[int], seed: int = 0) -> dict:
    """One row: ``texts[i]`` text tokens before image i (and after the last). ``images``: Qwen grids (h, w) in
    patches, or anything (its length counts) for Gemma-3, whose images all give 4 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids, types, pix, grids = [], [], [], []
    for i, n in enumerate(texts):
        ids += _text(n, 7 * i + seed)
        types += [0] * n
        if i == len(images):
            break
        if name == "gemma3":
            ids += [251] + [250] * 4 + [252]
            types += [0, 1, 1, 1, 1, 0]
            pix.append(torch.randn(1, 3, 32, 32, generator=g))
        else:
            h, w = images[i]
            ids += [252] + [250] * (h * w // 4) + [253]
            types += [0] + [1] * (h * w // 4) + [0]
            pix.append(torch.randn(h * w, 1176, generator=g))
            grids.append([1, h, w])
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    key = "token_type_ids" if name == "gemma3" else "mm_token_type_ids"
    out[key] = torch.tensor([types])
    if pix:
        out["pixel_values"] = torch.cat(pix)
        if grids:
            out["image_grid_thw"] = torch.tensor(grids)
    return out


def video_prompt(name: str, media: list, texts: list[int], seed: int = 0) -> dict:
    """A Qwen2/2.5-VL row of images and videos: ``media[i]`` is an image grid ``(h, w)`` in patches or a video
    grid ``(t, h, w)`` (t temporal groups of two frames); ``texts[i]`` text tokens before item i and after the
    last."""
    g = torch.Generator().manual_seed(seed)
    ids, types = [], []
    pix, grids, vpix, vgrids = [], [], [], []
    for i, n in enumerate(texts):
        ids += _text(n, 7 * i + seed)
        types += [0] * n
        if i == len(media):
            break
        t, h, w = media[i] if len(media[i]) == 3 else (0, *media[i])
        video = t > 0
        count = max(t, 1) * h * w
        ids += [252] + [251 if video else 250] * (count // 4) + [253]
        types += [0] + [2 if video else 1] * (count // 4) + [0]
        (vpix if video else pix).append(torch.randn(count, 1176, generator=g))
        (vgrids if video else grids).append([max(t, 1), h, w])
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
           "mm_token_type_ids": torch.tensor([types])}
    if pix:
        out["pixel_values"], out["image_grid_thw"] = torch.cat(pix), torch.tensor(grids)
    if vpix:
        out["pixel_values_videos"], out["video_grid_thw"] = torch.cat(vpix), torch.tensor(vgrids)
    return out


def batch(name: str, rows: list[dict]) -> dict:
    """Left-pad rows to one length and stack them."""
    S = max(r["input_ids"].shape[1] for r in rows)
    out = {}
    for key in rows[0]:
        if key in ("pixel_values", "image_grid_thw"):
            out[key] = torch.cat([r[key] for r in rows if key in r])
        else:
            out[key] = torch.stack([torch.nn.functional.pad(r[key][0], (S - r[key].shape[1], 0)) for r in rows])
    return out




@contextlib.contextmanager
def reference_attention(model, layout: Layout, profile: Profile):
    """Eager reference: every language-model attention head gets the DESIGN.md §2 mask of its category.

    Forward pre-hooks tell which decoder layer runs; SDPA is intercepted and given
    ``reference_mask(layout, layer categories) AND the call's own mask`` for prefill calls: the whole prompt, or
    a chunk at an offset whose keys are the first K tokens of ``layout`` (caches that keep every token).
    """
    sdpa = torch.nn.functional.scaled_dot_product_attention
    current = {"layer": None}
    handles = []
    for name, module in model.named_modules():
        m = re.search(r"(?:^|\.)layers\.(\d+)\.self_attn$", name)
        if m and "vision" not in name:
            layer = int(m.group(1))
            handles.append(module.register_forward_pre_hook(lambda mod, args, layer=layer: current.update(layer=layer)))
            handles.append(module.register_forward_hook(lambda mod, args, out: current.update(layer=None)))

    def patched(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        S, K = q.shape[2], k.shape[2]
        # prefill: the whole prompt, or queries at an offset continuing a cache (full attention: the keys are the
        # first K tokens of the layout's sequence, the queries its rows K - S ..)
        if current["layer"] is not None and 1 < S <= K <= layout.seq_len and (S == K or attn_mask is not None):
            cats = profile.layer_categories(current["layer"])
            prefix = Layout(layout.image[:, :K], layout.sink[:, :K])
            mask = reference_mask(prefix, cats, BaseMask(causal=False), torch.arange(K - S, K))
            if attn_mask is not None:
                mask = mask & attn_mask
            elif is_causal:
                mask = mask & torch.ones(S, S, dtype=torch.bool).tril()
            return sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)

    torch.nn.functional.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()


def layout_of(model, inputs) -> Layout:
    return Layout.from_input_ids(inputs["input_ids"], Template.from_config(model.config), inputs["attention_mask"])


def save_tiny_gemma3_processor(path) -> None:
    """A word-level Gemma-3 processor (ids match ``build("gemma3")``), built offline and saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3 import Gemma3ImageProcessorPil

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(246)])}
    vocab.update({"<image_soft_token>": 250, "<start_of_image>": 251, "<end_of_image>": 252})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>"})
    Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok,
                    image_seq_length=4).save_pretrained(path)


def mixed_profile(model, seed=0):
    """Every layer gets every category, in a random head order."""
    rng = random.Random(seed)
    info = ModelInfo.from_config(model)
    layers = []
    for _ in range(info.num_layers):
        heads = [Category(i % 4) for i in range(info.num_heads)]
        rng.shuffle(heads)
        layers.append(heads)
    return Profile.from_categories(layers, model)
