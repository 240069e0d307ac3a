"""dedupd: keep image datasets free of perceptual duplicates."""

__version__ = "0.1.0"
