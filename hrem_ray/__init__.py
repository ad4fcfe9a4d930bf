"""HREM image-text matching, trained, tuned and served on Ray."""

from hrem_ray.ray_runtime import OFFLINE_ENV, set_env_defaults

# Backbones are local folders: the offline switches must be in place before any module of
# the package (or a user's script after it) imports transformers.
set_env_defaults(OFFLINE_ENV)

__version__ = "0.1.0"
