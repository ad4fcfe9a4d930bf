"""HREM model: towers, instance-level relation module and losses."""

from hrem_ray.model.hrem import HREM, Encoded, LossOutput, build_model, hrem_loss

__all__ = ["HREM", "Encoded", "LossOutput", "build_model", "hrem_loss"]
