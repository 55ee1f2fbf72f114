"""Tiny offline Qwen3-VL-MoE (model_type ``qwen3_vl_moe``): same ids, vision tower and processor as ``qwen3_vl``
(Qwen3-VL-MoE checkpoints use the same ``Qwen3VLProcessor``); the text decoder has MoE MLPs (4 experts, top-2).
Its text attention class is ``Qwen3VLMoeTextAttention(Qwen3VLTextAttention): pass`` (modular_qwen3_vl_moe.py)."""

from __future__ import annotations

import torch

from .qwen3_vl import IMAGE, MERGE, PATCH, TPATCH, VEND, VIDEO, VSTART, make_processor, prompt, video_prompt  # noqa: F401


def build(attn_implementation: str = "sdpa"):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen3VLMoeConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=254,
                         eos_token_id=255, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=TPATCH, out_hidden_size=64,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    cfg._attn_implementation = attn_implementation
    model = Qwen3VLMoeForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model
