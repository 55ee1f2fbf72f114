"""BlindSight: sparse multi-image VLM prefill from per-head attention categories, as a torch.compile pass."""

__version__ = "0.1.0"

from .layout import Layout, LayoutError, Template, input_ids_from_spec, parse_layout_spec, use_layout
from .masks import BaseMask, build_block_mask, reference_mask
from .profile import Category, ModelInfo, Profile, ProfileFormatError, ProfileMismatchError
from .stats import reset_stats, sparse_fraction, stats
from .fx import BackendOptions, UnsupportedAttentionError, blindsight_backend
from .calibrate import calibrate
from .attention import attach, detach
