"""The eager path: BlindSight through transformers' attention interface, with no compilation.

``blindsight.attach(model, profile)`` registers the attention function ``"blindsight"`` (and, as its mask
function, transformers' own SDPA mask) with transformers' ``AttentionInterface`` /
``AttentionMaskInterface``, and switches the language model's attention to it; the vision tower keeps its
own. Every language-model attention call then runs :func:`blindsight.lowering.sparse_attention`, the same
exact lowering the compiled path runs, with the layout of the call's prompt: a :func:`blindsight.use_layout`
block, else the ``input_ids`` of the innermost running model call that has them
(:func:`blindsight.sequence.running_prompts`). Prefill, ``generate`` (its decode steps are dense by
definition), any length and batch. ``detach(model)`` restores the previous implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fx.options import BackendOptions
from .hf import UnsupportedAttentionError, language_model_layer, not_sdpa_message, text_config_key
from .layout import prompt_layout
from .lowering import dense_attention, never_pays, sparse_attention
from .profile import Profile, check_template
from .stats import record_fallback
from .template import Template

__all__ = ["attach", "detach", "check", "is_attached", "ATTENTION_NAME"]

ATTENTION_NAME = "blindsight"


@dataclass(frozen=True)
class _Attached:
    """What one attached attention module needs at every call."""

    heads: tuple[int, ...]
    template: Template | None
    options: BackendOptions


def blindsight_attention_forward(module: torch.nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                                 scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention function: ``(out [B, S, H, D], None)``, sparse where the module is attached."""
    state: _Attached | None = getattr(module, "_blindsight", None)
    if state is None or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if state is not None:
            record_fallback("unsupported_attention", 1, state.options.warn_on_fallback)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:  # prefill into an empty static cache, as transformers' SDPA path does
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    warn = state.options.warn_on_fallback
    if dropout:
        record_fallback("dropout", 1, warn)
        out = dense_attention(query, key, value, attention_mask, scaling, is_causal, dropout)
    elif q_len > 1 and key.shape[2] == q_len and state.options.only_if_faster and never_pays(
            state.options.lowering, query.device, query.dtype, query.shape[0], q_len, query.shape[1], key.shape[1],
            query.shape[3], state.heads):
        # too short to gain whatever the layout (as the compiled path's dense graph): no layout work
        record_fallback("not_faster", 1, warn)
        out = dense_attention(query, key, value, attention_mask, scaling, is_causal)
    else:
        # decode is dense by definition: no need to find the prompt
        layout, reason = (None, None) if q_len == 1 else prompt_layout(state.template, warn=warn,
                                                                       seq_len=key.shape[2], query_len=q_len)
        out = sparse_attention(query, key, value, attention_mask, layout, state.heads, scaling, is_causal,
                               state.options.lowering, state.options.block_size, reason, warn,
                               state.options.only_if_faster)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, blindsight_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def attach(model: torch.nn.Module, profile: Profile, options: BackendOptions | None = None, **overrides):
    """Run the language model's attention of ``model`` (a transformers model) sparse, eagerly; returns ``model``.

    The profile is checked against the model first (:class:`~blindsight.ProfileMismatchError`), template
    included. ``options``/``overrides``: :class:`~blindsight.BackendOptions` (``template``, ``lowering``,
    ``block_size``, ``warn_on_fallback``, ``only_if_faster``; the compile options do not apply).
    """
    from dataclasses import replace

    if not isinstance(profile, Profile):
        raise TypeError(f"attach needs a blindsight.Profile, got {type(profile).__name__}")
    options = replace(options or BackendOptions(), **overrides) if overrides else (options or BackendOptions())
    template, modules = _checked(model, profile, options, compiled=False)
    _register()
    config = model.config
    key = text_config_key(config)
    sub = getattr(config, key) if key else config
    # re-attaching keeps the implementation from before the first attach, which detach restores
    previous = model.__dict__["_blindsight_previous"][1] if is_attached(model) else sub._attn_implementation
    for name, m in modules:
        m._blindsight = _Attached(tuple(int(c) for c in profile.layer_categories(language_model_layer(name))),
                                  template, options)
    model._blindsight_previous = (key, previous)
    model.set_attn_implementation({key: ATTENTION_NAME} if key else ATTENTION_NAME)
    return model


def check(model: torch.nn.Module, profile: Profile, options: BackendOptions | None = None,
          compiled: bool = True) -> None:
    """Every check BlindSight makes of ``model`` before it runs it, now, each as its own exception: the profile
    against the model's config (:class:`~blindsight.ProfileMismatchError`), the template against its ids, and
    (``compiled``) that its language-model attention calls SDPA (:class:`~blindsight.UnsupportedAttentionError`).
    :func:`attach` makes them; call it before ``torch.compile(model, backend=blindsight_backend(profile))``
    to get them before compiling (the compiled model raises them at its first call)."""
    if not isinstance(profile, Profile):
        raise TypeError(f"check needs a blindsight.Profile, got {type(profile).__name__}")
    _checked(model, profile, options or BackendOptions(), compiled)


def _checked(model, profile: Profile, options: BackendOptions, compiled: bool):
    """(template, language-model attention modules) of ``model`` after :func:`check`'s checks."""
    config = model.config
    profile.check_model(config)
    template = options.template if options.template is not None else profile.template
    if template is not None:
        check_template(template, config, options.template is not None)
    modules = [(name, m) for name, m in model.named_modules() if language_model_layer(name) is not None]
    if not modules:
        raise ValueError("found no language-model attention modules (...layers.<i>.self_attn) in this model")
    if compiled:
        key = text_config_key(config)
        implementation = (getattr(config, key) if key else config)._attn_implementation
        if implementation != "sdpa":
            raise UnsupportedAttentionError(not_sdpa_message(modules[0][0]) + f" (it is {implementation!r})")
    return template, modules


def detach(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`attach`: the language model's previous attention implementation, no BlindSight state."""
    key, previous = model.__dict__.pop("_blindsight_previous", (None, None))
    for _, m in model.named_modules():
        m.__dict__.pop("_blindsight", None)
    if previous is not None:
        model.set_attn_implementation({key: previous} if key else previous)
    return model


def is_attached(model: torch.nn.Module) -> bool:
    """Is ``model`` attached (:func:`attach` called and not undone)?"""
    return "_blindsight_previous" in model.__dict__
