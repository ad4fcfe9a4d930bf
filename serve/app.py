"""``serve run serve.app:app_builder checkpoint=CKPT gallery=GALLERY`` from the repo root.

The application itself lives in ``hrem_ray.serving.app`` so that ``serve deploy
serve/config.yaml`` imports it from the installed package (no working_dir needed).
"""

from hrem_ray.serving.app import app_builder

__all__ = ["app_builder"]
