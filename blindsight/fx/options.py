"""Options of the compiler pass: a frozen, validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lowering import resolve_lowering
from ..template import Template

__all__ = ["BackendOptions"]


@dataclass(frozen=True)
class BackendOptions:
    """Options of :func:`blindsight.blindsight_backend`.

    - ``template``: how images are marked in ``input_ids``; default: the profile's model template.
    - ``block_size``: FlexAttention tile size (query and key).
    - ``warn_on_fallback``: warn at every call that runs dense (by default: once per reason and process,
      and never for the calls that are dense by definition: decode, text-only prompts).
    - ``compile_dense``: compile each graph with Inductor (default), or run the rewritten graph as traced
      (``False``: faster start-up, e.g. in tests; the sparse attention itself is the same either way).
    - ``lowering``: how a sparse call runs. ``"flex"``: FlexAttention with the per-head BlockMask (the GPU
      lowering and the reference); ``"segments"``: SDPA per image segment over gathered keys, faster on CPU
      where the flex kernel is slow; ``"auto"`` (default): segments on CPU, flex elsewhere.
    - ``only_if_faster``: run a call sparse only where the cost model (:mod:`blindsight.lowering.cost`,
      rates measured on this machine at first use) predicts it beats the dense call; otherwise run it dense,
      counted as ``fallback.not_faster`` (default True). ``False``: every call that can be sparse is.
    - ``recompile_limit``: raise ``torch._dynamo.config.recompile_limit`` to at least this (default 64;
      ``None``: leave it alone). transformers' forward decorators share one code object (``wrapper``) across
      every decorated forward of a model, so Dynamo's default limit of 8 per code object fills up after two or
      three prompt lengths and the whole forward then runs uncompiled. A hit is counted
      (``fallback.recompile_limit``) and warned.
    """

    template: Template | None = None
    block_size: int = 128
    warn_on_fallback: bool = False
    compile_dense: bool = True
    lowering: str = "auto"
    recompile_limit: int | None = 64
    only_if_faster: bool = True

    def __post_init__(self):
        if self.template is not None and not isinstance(self.template, Template):
            raise TypeError("BackendOptions.template must be a blindsight.Template, got "
                            f"{type(self.template).__name__}")
        if not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"BackendOptions.block_size must be a power of two >= 16, got {self.block_size!r}")
        if not isinstance(self.lowering, str):
            raise ValueError(f"BackendOptions.lowering must be a string, got {self.lowering!r}")
        resolve_lowering(self.lowering, "cpu")  # raises for an unknown name
        if self.recompile_limit is not None and (type(self.recompile_limit) is not int or self.recompile_limit < 1):
            raise ValueError("BackendOptions.recompile_limit must be a positive int or None, got "
                             f"{self.recompile_limit!r}")
        for name in ("warn_on_fallback", "compile_dense", "only_if_faster"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BackendOptions.{name} must be a bool, got {getattr(self, name)!r}")

    def lowering_for(self, device: torch.device) -> str:
        return resolve_lowering(self.lowering, device)
