"""Compatibility name: the numpy encoder now lives in ``shared.codec`` itself."""

from shared.codec import encode_array, prefers_per_channel_array

__all__ = ["encode_array", "prefers_per_channel_array"]
