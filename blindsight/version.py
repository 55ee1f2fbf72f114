"""The package version (one place: the profile file records it)."""

__version__ = "0.1.0"
