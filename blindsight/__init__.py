"""BlindSight: sparse multi-image VLM prefill from per-head attention categories, as a torch.compile pass.

The public surface (everything else is reachable from its module, with no promise of stability):

- run a model sparse: :func:`blindsight_backend` (``torch.compile(model, backend=blindsight_backend(profile))``)
  with :class:`BackendOptions`, or eagerly :func:`attach` / :func:`detach`;
- profiles: :class:`Profile` (load, save, decide, recall), :class:`ModelInfo`, :class:`Category`,
  :func:`calibrate`, and :func:`tune` with :class:`TuneConfig` (the fewest attention FLOPs within an accuracy
  budget of dense, on held-out examples);
- where the images are: :class:`Template`, :class:`Layout`, :func:`use_layout`, :func:`parse_layout_spec`,
  :func:`input_ids_from_spec`;
- masks: :class:`BaseMask`, :func:`build_block_mask`, :func:`reference_mask` (more in :mod:`blindsight.masks`);
- checks before running: :func:`check` (the profile, template and attention implementation against a model);
- what happened: :func:`stats`, :func:`sparse_fraction`, :func:`reset_stats`;
- memory: :func:`cache_info`, :func:`set_cache_limits`, :func:`clear_caches` (every cache is bounded);
- errors: :class:`LayoutError`, :class:`ProfileFormatError`, :class:`ProfileMismatchError`,
  :class:`UnsupportedAttentionError`.

The semantics are in docs/DESIGN.md.
"""

from .attention import attach, check, detach
from .cache import cache_info, clear_caches, set_cache_limits
from .calibrate import calibrate
from .categories import Category
from .fx import BackendOptions, blindsight_backend
from .hf import UnsupportedAttentionError
from .layout import Layout, input_ids_from_spec, parse_layout_spec, use_layout
from .masks import BaseMask, build_block_mask, reference_mask
from .profile import ModelInfo, Profile, ProfileFormatError, ProfileMismatchError
from .stats import reset_stats, sparse_fraction, stats
from .template import LayoutError, Template
from .tune import TuneConfig, tune
from .version import __version__

__all__ = [
    "__version__",
    # running a model sparse
    "blindsight_backend",
    "BackendOptions",
    "attach",
    "detach",
    "check",
    # profiles
    "Profile",
    "ModelInfo",
    "Category",
    "calibrate",
    "tune",
    "TuneConfig",
    # layouts
    "Template",
    "Layout",
    "use_layout",
    "parse_layout_spec",
    "input_ids_from_spec",
    # masks
    "BaseMask",
    "build_block_mask",
    "reference_mask",
    # counters
    "stats",
    "sparse_fraction",
    "reset_stats",
    # memory
    "cache_info",
    "set_cache_limits",
    "clear_caches",
    # errors
    "LayoutError",
    "ProfileFormatError",
    "ProfileMismatchError",
    "UnsupportedAttentionError",
]
