"""Safetensors dtypes as NumPy sees them, and exact float32 conversions, without importing torch.

The streaming merge (`dem-hf merge`, [`DEMMerger.save_pretrained`]) works on NumPy arrays so that it never
pays torch's start-up. NumPy has no bfloat16, so a `BF16` tensor is held as its raw 16-bit patterns
(`uint16`) and converted here with integer operations that give exactly the values torch gives:
widening is exact, and narrowing rounds to nearest, ties to even, as `torch.Tensor.to(torch.bfloat16)` does
(a NaN stays a NaN, written as `0x7FC0`; torch's own NaN bits differ between its kernels).
"""

from __future__ import annotations

import numpy as np

# Safetensors dtype name -> the NumPy dtype that holds its bytes (bfloat16 as its 16-bit patterns).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
# Safetensors dtype name <-> the name of the matching `torch.dtype` attribute.
TORCH_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
SAFETENSORS_NAMES: dict[str, str] = {torch_name: name for name, torch_name in TORCH_NAMES.items()}

BF16_NAN = np.uint16(0x7FC0)


def itemsize(dtype_name: str) -> int:
    """Bytes per value of a safetensors dtype."""
    return STORAGE_DTYPES[dtype_name].itemsize


def torch_dtype_label(dtype_name: str) -> str:
    """`str()` of the matching `torch.dtype` (e.g. `"torch.bfloat16"`), without importing torch."""
    return f"torch.{TORCH_NAMES[dtype_name]}"


def dtype_name_of_torch(dtype) -> str:
    """The safetensors name of a `torch.dtype`; `ValueError` for dtypes safetensors files here cannot hold."""
    name = SAFETENSORS_NAMES.get(str(dtype).removeprefix("torch."))
    if name is None:
        raise ValueError(f"Unsupported dtype {dtype}; expected one of {sorted(SAFETENSORS_NAMES)}.")
    return name


def to_float32(values: np.ndarray, dtype_name: str, out: np.ndarray | None = None) -> np.ndarray:
    """`values` (stored as `dtype_name`) as float32: a view when already float32, else written into `out`."""
    if dtype_name == "F32":
        return values
    if out is None:
        out = np.empty(values.shape, dtype=np.float32)
    if dtype_name == "BF16":
        bits = out.view(np.uint32)
        np.left_shift(values, 16, out=bits, dtype=np.uint32)  # a bfloat16 is the high half of a float32
        return out
    np.copyto(out, values, casting="same_kind")
    return out


def from_float32(values: np.ndarray, dtype_name: str, out: np.ndarray | None = None) -> np.ndarray:
    """Round float32 `values` once to `dtype_name` (nearest, ties to even), written into `out` if given.

    `values` is used as scratch space for bfloat16 (its contents are undefined afterwards).
    """
    if dtype_name == "F32":
        return values
    if out is None:
        out = np.empty(values.shape, dtype=STORAGE_DTYPES[dtype_name])
    if dtype_name != "BF16":
        with np.errstate(over="ignore", invalid="ignore"):  # out of range becomes inf, as in torch, silently
            np.copyto(out, values, casting="same_kind")
        return out
    nan = np.isnan(values) if np.isnan(values.max(initial=0.0)) else None  # max propagates NaN: one fast pass
    bits = values.view(np.uint32)
    bias = bits >> 16  # round half to even: add 0x7FFF, plus one more when the kept part is odd
    bias &= 1
    bias += 0x7FFF
    bits += bias  # wraps only for NaN payloads, which are replaced below
    np.right_shift(bits, 16, out=out, casting="unsafe")
    if nan is not None:
        out[nan] = BF16_NAN
    return out


# Exponent bits of the half-precision storage dtypes: all set means inf or NaN.
HALF_EXPONENT_BITS = {"F16": 0x7C00, "BF16": 0x7F80}


def all_finite(block: np.ndarray, dtype: str, pool) -> bool:
    """Whether a block in storage dtype `dtype` holds no NaN or inf, in one cheap pass into a pooled buffer.

    Half-precision blocks are tested on their bit patterns (all exponent bits set means inf or NaN; NumPy has no
    bfloat16), wider ones with `np.isfinite` (about as fast as one float32 add of the block).
    """
    if dtype in HALF_EXPONENT_BITS:
        mask = HALF_EXPONENT_BITS[dtype]
        bits = np.bitwise_and(block.view(np.uint16), mask, out=pool.take("exponent", np.uint16, block.size).reshape(block.shape))
        return int(bits.max(initial=0)) != mask
    return bool(np.isfinite(block, out=pool.take("finite", np.bool_, block.size).reshape(block.shape)).all())
