"""The compiler pass: site discovery (:mod:`.sites`), the rewrite (:mod:`.rewrite`) and the run time
(:mod:`.runtime`) of ``blindsight_backend``; its options (:mod:`.options`)."""

from .options import BackendOptions
from .rewrite import rewrite_sites
from .runtime import BlindSightBackend, GraphRunner, blindsight_backend
from .sites import Site, SiteScan, find_sites

__all__ = ["BackendOptions", "BlindSightBackend", "GraphRunner", "blindsight_backend", "Site", "SiteScan",
           "find_sites", "rewrite_sites"]
