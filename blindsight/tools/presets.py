"""The built-in examples of the command line: a model shape and a layout and head mix to measure it on."""

from __future__ import annotations

__all__ = ["QWEN2_VL_2B_TEXT", "DEMO_LAYOUT", "DEMO_MIX"]

# Qwen2-VL-2B's language model: the built-in example of `blindsight flops` (no weights needed to count FLOPs)
QWEN2_VL_2B_TEXT = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, vocab_size=151936)
# W1: 16 images of 496 tokens with 16 text tokens between them, 8336 tokens in all
DEMO_LAYOUT = "text:64,(image:496,text:16)x16,text:80"
# three heads of each category, for a 12-head layer
DEMO_MIX = "dense:3,intra_sink:3,intra:3,sink:3"
