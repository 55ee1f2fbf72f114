"""BlindSight: sparse multi-image VLM prefill from per-head attention categories, as a torch.compile pass."""

from .version import __version__
from .layout import Layout, LayoutError, Template, input_ids_from_spec, parse_layout_spec, use_layout
from .categories import Category
from .masks import BaseMask, build_block_mask, reference_mask
from .profile import ModelInfo, Profile, ProfileFormatError, ProfileMismatchError
from .stats import reset_stats, sparse_fraction, stats
from .hf import UnsupportedAttentionError
from .fx import BackendOptions, blindsight_backend
from .calibrate import calibrate
from .attention import attach, detach
