"""HREM image-text matching, trained, tuned and served on Ray."""

__version__ = "0.1.0"
