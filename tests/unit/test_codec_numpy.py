"""shared.codec.encode_array: numpy arrays encode exactly as torch tensors do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import codec_torch
from shared.codec import encode_array, prefers_per_channel_array
from shared.errors import CodecError


def _arrays() -> st.SearchStrategy[np.ndarray]:
    shapes = st.sampled_from([(1, 7), (1, 3, 5, 5), (2, 8, 9, 9), (1, 16, 1, 64), (1, 4, 8)])
    return st.tuples(shapes, st.integers(0, 2**31 - 1), st.sampled_from([0.0, 1.0, -3.0]),
                     st.floats(1e-6, 1e4)).map(_make)


def _make(args: tuple[tuple[int, ...], int, float, float]) -> np.ndarray:
    shape, seed, offset, spread = args
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(shape) * spread + offset).astype(np.float32)
    if a.ndim >= 3:
        a[:, 0] *= 50  # one loud channel, so both per-channel answers occur
    return a


@settings(max_examples=60, deadline=None)
@given(_arrays(), st.booleans())
def test_encode_array_matches_the_torch_codec_byte_for_byte(a: np.ndarray, per_channel: bool
                                                           ) -> None:
    want = codec_torch.encode_tensor(torch.from_numpy(a.copy()), per_channel=per_channel)
    assert encode_array(a, per_channel=per_channel) == want


@settings(max_examples=60, deadline=None)
@given(_arrays())
def test_per_channel_choice_matches_the_torch_codec(a: np.ndarray) -> None:
    want = codec_torch.prefers_per_channel(torch.from_numpy(a.copy()))
    assert prefers_per_channel_array(a) == want


def test_round_trip_through_the_torch_decoder() -> None:
    a = np.linspace(-2, 6, 1 * 4 * 8 * 8, dtype=np.float32).reshape(1, 4, 8, 8)
    enc = encode_array(a, per_channel=True)
    back = codec_torch.decode_tensor(enc).numpy()
    assert np.max(np.abs(back - a)) <= max(enc.scale) / 2 + 1e-6


@pytest.mark.parametrize("bad", [np.array([[np.nan, 1.0]], np.float32),
                                 np.array([[np.inf]], np.float32)], ids=["nan", "inf"])
def test_non_finite_values_raise_codec_error(bad: np.ndarray) -> None:
    with pytest.raises(CodecError):
        encode_array(bad)


@pytest.mark.parametrize("bad", [np.zeros((1, 3), np.float64), np.zeros((0, 3), np.float32),
                                 np.zeros((), np.float32)], ids=["float64", "empty", "scalar"])
def test_bad_arrays_raise_value_error(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_array(bad)
