"""Tiny offline models of the VLM families BlindSight supports beyond Qwen2/2.5-VL and Gemma-3, one module per
transformers model type: ``build(attn_implementation)`` (random weights from a config) and ``prompt(images, texts)``
(model inputs whose image tokens are what the family's own processor writes; each module says where a stand-in
replaces a part that needs torchvision or timm, which this machine does not have)."""
