"""Compatibility name: ``to_array`` now lives in ``shared.preprocess`` itself."""

from shared.preprocess import to_array

__all__ = ["to_array"]
