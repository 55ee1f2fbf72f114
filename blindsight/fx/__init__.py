"""The compiler pass: site discovery, the rewrite, and the run time of ``blindsight_backend``."""

from .options import BackendOptions
from .runtime import BlindSightBackend, blindsight_backend
from .sites import UnsupportedAttentionError, find_sites, language_model_layer, not_sdpa_message

__all__ = ["BackendOptions", "BlindSightBackend", "blindsight_backend", "UnsupportedAttentionError", "find_sites",
           "language_model_layer", "not_sdpa_message"]
