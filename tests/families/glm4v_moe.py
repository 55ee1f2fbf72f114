"""Tiny offline GLM-4.5V (model_type ``glm4v_moe``): the ids, vision tower and processor of ``glm4v``; the text
decoder's second layer has MoE MLPs (4 routed experts, top-2, one shared). Its attention is GLM-4V's."""

from __future__ import annotations

import torch

from .glm4v import BOI, BOV, EOI, EOV, IMAGE, MERGE, PATCH, TPATCH, VIDEO, make_processor, prompt, video_prompt  # noqa: F401


def build(attn_implementation: str = "sdpa"):
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    torch.manual_seed(0)
    cfg = Glm4vMoeConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1],
                                          "partial_rotary_factor": 0.5}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                           image_size=56, spatial_merge_size=MERGE, temporal_patch_size=TPATCH, out_hidden_size=64),
        image_token_id=IMAGE, video_token_id=VIDEO, image_start_token_id=BOI, image_end_token_id=EOI,
        video_start_token_id=BOV, video_end_token_id=EOV)
    cfg._attn_implementation = attn_implementation
    model = Glm4vMoeForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model
