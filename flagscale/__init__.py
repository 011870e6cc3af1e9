"""FlagScale-style Pi0 inference server."""

__version__ = "0.1.0"
