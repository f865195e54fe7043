"""The NumPy side of the streaming merge: bfloat16 and float16 conversions give exactly torch's values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dem_hf.io.dtypes import STORAGE_DTYPES, from_float32, to_float32
from dem_hf.io.reader import to_numpy, to_torch


def awkward_float32() -> torch.Tensor:
    """Random values at many scales plus the cases rounding gets wrong: ties, overflow, subnormals, inf, NaN."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-40, 38, 2000, dtype=torch.float64)
    random = (torch.randn(2000, dtype=torch.float64, generator=generator) * scales).to(torch.float32)
    bits = torch.tensor(
        [0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x80008000, 0x007FFFFF,
         0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x00000000, 0x80000000],
        dtype=torch.int64,
    ).to(torch.int32)  # ties to even (both ways), round-up to inf, subnormals, infinities, NaN payloads, zeros
    return torch.cat([random, bits.view(torch.float32)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_rounding_float32_matches_torch_bit_for_bit(dtype):
    values = awkward_float32()
    name = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}[dtype]
    expected = values.to(dtype)
    got = from_float32(values.numpy().copy(), name)
    assert got.dtype == STORAGE_DTYPES[name]
    nan = values.isnan()
    assert to_torch(got, name).isnan().equal(nan)  # NaN stays NaN (torch's own NaN bits differ between its kernels)
    assert np.array_equal(got[~nan.numpy()].view(np.uint8), to_numpy(expected[~nan]).view(np.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.float32])
def test_widening_to_float32_matches_torch_bit_for_bit(dtype):
    stored = awkward_float32().to(dtype)
    name = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64", torch.float32: "F32"}[dtype]
    got = to_float32(to_numpy(stored), name)
    assert np.array_equal(got.view(np.uint32), stored.float().numpy().view(np.uint32))


def test_torch_round_trip_shares_memory_for_bfloat16():
    tensor = torch.randn(4, 3).to(torch.bfloat16)
    array = to_numpy(tensor)
    assert array.dtype == np.uint16
    back = to_torch(array, "BF16")
    assert back.dtype == torch.bfloat16 and torch.equal(back, tensor)
    array[0, 0] = 0  # a view, not a copy
    assert back[0, 0].item() == 0.0
