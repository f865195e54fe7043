"""LoRA merges without torch: the streaming merge forms each block's Σ ω_i s_i B_i[rows] A_i with NumPy.

Oracles from outside the code under test: the torch arithmetic the streaming merge used before (`addmm_` on a float32
accumulator, kept here as `torch_reference`), a float64 hand computation with a rounding-error bound, and PEFT's own
`merge_and_unload()` (tests/test_lora_peft.py runs its whole fixture zoo through the same engine).
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from dem_hf import DEMMerger, DistributionVector
from dem_hf.io.dtypes import TORCH_NAMES, to_float32
from dem_hf.io.reader import BufferPool, CheckpointReader
from dem_hf.io.tensors import TensorDict, untied_state_dict
from dem_hf.merging.arithmetic import merged_blocks, row_blocks
from dem_hf.merging.operators import MergeOperator
from dem_hf.vectors.config import LoraModule

from .conftest import make_llama

DTYPES = ["F32", "BF16", "F16"]
BLOCK_VALUES = 60  # a few rows per block: every tensor spans several blocks
INPUT_IDS = torch.tensor([[2, 5, 9, 17, 33, 8, 41, 3]])


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, TORCH_NAMES[name])


# ============================================================== synthetic vectors in every dtype


def synthetic_world(factor_dtype: str, base_dtype: str) -> tuple[TensorDict, list[DistributionVector]]:
    """A base with a linear weight `w` (37 x 23), an embedding-like `e` (41 x 7, LoRA transposed) and a dense-only `d`;
    three vectors: rsLoRA rank 4 on `w` and transposed rank 3 on `e` beside a dense delta of `e` (an embedding adapter
    that saved its weight); rank 1 on `w` with a dense `d`; rank 16 (more than `w`'s rows per block) on `w`."""
    generator = torch.Generator().manual_seed(7)

    def randn(*shape, scale=1.0, dtype=factor_dtype):
        return (torch.randn(shape, generator=generator) * scale).to(torch_dtype(dtype))

    base = TensorDict({"w": randn(37, 23, dtype=base_dtype), "e": randn(41, 7, dtype=base_dtype), "d": randn(5, 3, dtype=base_dtype)})
    rs, rank4 = LoraModule(scaling=8 / math.sqrt(4)), LoraModule(scaling=2.0)
    first = DistributionVector("first", TensorDict({
        "w.lora_A": randn(4, 23, scale=0.3), "w.lora_B": randn(37, 4, scale=0.3),
        "e.lora_A": randn(3, 41, scale=0.3), "e.lora_B": randn(7, 3, scale=0.3), "e": randn(41, 7, scale=0.05),
    }), lora_modules={"w": rs, "e": LoraModule(scaling=0.75, transpose=True)})
    second = DistributionVector("second", TensorDict({
        "w.lora_A": randn(1, 23, scale=0.5), "w.lora_B": randn(37, 1, scale=0.5), "d": randn(5, 3, scale=0.1),
    }), lora_modules={"w": rank4})
    third = DistributionVector("third", TensorDict({
        "w.lora_A": randn(16, 23, scale=0.2), "w.lora_B": randn(37, 16, scale=0.2),
    }), lora_modules={"w": LoraModule(scaling=1 / 16)})
    return base, [first, second, third]


WEIGHTS = {"first": 0.7, "second": -1.3, "third": 2.0}


def numpy_merge(base: TensorDict, vectors, name: str, weights=WEIGHTS) -> np.ndarray:
    """Tensor `name` of the streaming merge (the code under test), in the base's storage dtype."""
    terms = [(v, weights[v.name]) for v in vectors if v.changes(name)]
    merged = merged_blocks(base, name, terms, BufferPool(), BLOCK_VALUES)
    return np.concatenate([np.array(block) for block in merged.blocks])


def torch_reference(base: TensorDict, vectors, name: str, weights=WEIGHTS) -> np.ndarray:
    """The streaming merge's torch arithmetic before this change, block by block: dense `w·Δ` rounded to float32 and
    added, each LoRA block by `addmm_(B[rows], A, alpha=w·s)` on float32 factors, the base last, one rounding."""
    tensor = base.get(name)
    out = torch.empty_like(tensor)
    for start, stop in row_blocks(tuple(tensor.shape), BLOCK_VALUES):
        accumulator = torch.zeros((stop - start, *tensor.shape[1:]), dtype=torch.float32)
        for vector in vectors:
            weight = weights[vector.name]
            if name in vector.dense_names:
                delta = vector.tensors.get(name)[start:stop].float()
                accumulator.add_(delta if weight == 1.0 else delta * weight)
            if name in vector.lora_modules:
                module = vector.lora_modules[name]
                a, b = vector.tensors.get(name + ".lora_A").float(), vector.tensors.get(name + ".lora_B").float()
                if module.transpose:
                    accumulator.addmm_(a[:, start:stop].T, b.T, alpha=weight * module.scaling)
                else:
                    accumulator.addmm_(b[start:stop], a, alpha=weight * module.scaling)
        accumulator.add_(tensor[start:stop])
        out[start:stop] = accumulator.to(tensor.dtype)
    return as_float32(out)


def float64_reference(base: TensorDict, vectors, name: str, weights=WEIGHTS) -> tuple[np.ndarray, np.ndarray]:
    """The exact merge in float64 (from the stored values), and a bound on the float32 accumulation's error: each value
    enters through at most `rank + 3 + vectors` float32 roundings (scaled factor, products and sums, the additions)."""
    exact = base.get(name).double().numpy().copy()
    magnitude = np.abs(exact)
    roundings = 3 + len(vectors)
    for vector in vectors:
        weight = weights[vector.name]
        if name in vector.dense_names:
            delta = weight * vector.tensors.get(name).double().numpy()
            exact, magnitude = exact + delta, magnitude + np.abs(delta)
        if name in vector.lora_modules:
            module = vector.lora_modules[name]
            a, b = vector.tensors.get(name + ".lora_A").double().numpy(), vector.tensors.get(name + ".lora_B").double().numpy()
            scale = weight * module.scaling
            product, absolute = scale * (b @ a), abs(scale) * (np.abs(b) @ np.abs(a))
            if module.transpose:
                product, absolute = product.T, absolute.T
            exact, magnitude = exact + product, magnitude + absolute
            roundings += a.shape[0]
    return exact, roundings * 2.0**-24 * magnitude


def as_float32(values) -> np.ndarray:
    """Storage values (NumPy in storage dtype, or a torch tensor) as float32."""
    if isinstance(values, torch.Tensor):
        return values.float().numpy()
    if values.dtype == np.uint16:
        return to_float32(values, "BF16")
    return values.astype(np.float32)


def ulps_apart(x: np.ndarray, y: np.ndarray, dtype: str) -> np.ndarray:
    """How many representable values of `dtype` lie between `x` and `y` (float32 arrays holding `dtype` values)."""
    def ordinal(values: np.ndarray) -> np.ndarray:
        bits = torch.from_numpy(np.ascontiguousarray(values)).to(torch_dtype(dtype)).view(
            {"F32": torch.int32, "BF16": torch.int16, "F16": torch.int16}[dtype]
        ).numpy().astype(np.int64)
        sign_bit = {"F32": 1 << 31, "BF16": 1 << 15, "F16": 1 << 15}[dtype]
        magnitude = bits & (sign_bit - 1)
        return np.where(bits < 0, -magnitude, magnitude)  # monotone in the value, ±0 equal

    return np.abs(ordinal(x) - ordinal(y))


def spacing(values: np.ndarray, dtype: str) -> np.ndarray:
    """One unit in the last place of `dtype` at each of `values` (float64)."""
    mantissa, smallest = {"F32": (23, -126), "BF16": (7, -126), "F16": (10, -14)}[dtype]
    exponent = np.maximum(np.floor(np.log2(np.maximum(np.abs(values), 2.0**smallest))), smallest)
    return 2.0 ** (exponent - mantissa)


@pytest.mark.parametrize("base_dtype", DTYPES)
@pytest.mark.parametrize("factor_dtype", DTYPES)
def test_numpy_lora_blocks_agree_with_the_torch_path_and_float64(factor_dtype, base_dtype):
    base, vectors = synthetic_world(factor_dtype, base_dtype)
    for name in ("w", "e", "d"):
        actual = as_float32(numpy_merge(base, vectors, name))
        before = torch_reference(base, vectors, name)
        if not any(name in v.lora_modules for v in vectors):  # the same arithmetic: bitwise
            np.testing.assert_array_equal(actual, before)
            continue
        # both engines are the exact value up to float32 accumulation and one rounding to the output dtype
        exact, accumulation = float64_reference(base, vectors, name)
        for result in (actual, before):
            error = np.abs(result.astype(np.float64) - exact)
            assert (error <= accumulation + spacing(np.maximum(np.abs(exact), np.abs(result)), base_dtype)).all(), name
        if base_dtype != "F32":
            # where the float32 sums cannot be half a step of the output dtype apart, the results are at most one step
            # apart (a sum that cancels to near zero is only bounded above); and mostly the very same values
            well_conditioned = accumulation < 0.5 * spacing(exact, base_dtype)
            assert well_conditioned.mean() > 0.9, name
            assert ulps_apart(actual, before, base_dtype)[well_conditioned].max() <= 1, name
            assert np.mean(actual == before) > 0.95, name


@pytest.mark.parametrize("factor_dtype", DTYPES)
def test_numpy_lora_blocks_from_a_saved_vector_equal_those_from_memory(factor_dtype, tmp_path):
    """Factors read from safetensors files (bf16 as bit patterns) give the in-memory factors' merge bit for bit."""
    base, vectors = synthetic_world(factor_dtype, "BF16")
    saved = []
    for vector in vectors:
        vector.save_pretrained(tmp_path / vector.name)
        saved.append(DistributionVector.from_pretrained(tmp_path / vector.name))
    assert isinstance(saved[0].tensors, CheckpointReader)
    for name in ("w", "e"):
        np.testing.assert_array_equal(numpy_merge(base, saved, name), numpy_merge(base, vectors, name))


def test_a_non_finite_lora_factor_is_refused_naming_it():
    base, vectors = synthetic_world("F32", "F32")
    vectors[1].tensors.get("w.lora_B")[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"'second' has NaN or infinite values in 'w.lora_B'"):
        numpy_merge(base, vectors, "w")


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_merge_operators_form_lora_deltas_in_numpy(method):
    """operator_blocks forms each LoRA delta in NumPy too: against the torch operator on torch-formed deltas."""
    base, vectors = synthetic_world("BF16", "F32")
    operator = MergeOperator(method=method, density=0.6, seed=3 if method.startswith("dare") else None)
    terms = [(v, WEIGHTS[v.name]) for v in vectors]
    merged = merged_blocks(base, "w", terms, BufferPool(), BLOCK_VALUES, operator)
    actual = np.concatenate([np.array(block) for block in merged.blocks])
    deltas = [v.delta("w") for v in vectors]  # torch addmm
    masks = None
    if operator.random:
        masks = [torch.from_numpy(m) for m in operator.keep_masks("w", [v.name for v in vectors], 0, (37, 23))]
    expected = (operator.combine_torch(deltas, list(WEIGHTS.values()), masks) + base.get("w")).numpy()
    assert ulps_apart(actual, expected, "F32").max() <= 4
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


# ============================================================== PEFT adapters, per-group coefficients, dem-hf merge


def peft_vector(tmp_path, base_dir, name: str, seed: int, **lora_kwargs) -> DistributionVector:
    """A saved vector of a PEFT adapter with random non-zero factors, read back from its folder."""
    torch.manual_seed(seed)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **lora_kwargs})
    peft_model = get_peft_model(make_llama(), config)
    peft_model.save_pretrained(tmp_path / f"adapter_{name}")
    vector = DistributionVector.from_peft(tmp_path / f"adapter_{name}", name=name, base=base_dir)
    vector.save_pretrained(tmp_path / "vectors" / name)
    return DistributionVector.from_pretrained(tmp_path / "vectors" / name)


@pytest.fixture
def peft_vectors(tmp_path, base_dir) -> list[DistributionVector]:
    """rsLoRA with rank and alpha patterns on all linear layers; LoRA on the tied embeddings (transposed) and q_proj."""
    return [
        peft_vector(
            tmp_path, base_dir, "rs", 1, target_modules="all-linear", use_rslora=True,
            rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3},
        ),
        peft_vector(tmp_path, base_dir, "tied", 2, r=16, lora_alpha=16, target_modules=["embed_tokens", "q_proj"]),
    ]


def dense_reference(base_dir, vectors, coefficients) -> dict[str, torch.Tensor]:
    """base + Σ ω Δ with torch's deltas (addmm) summed in float64, ω looked up per group as the merge does (the deltas
    of the random factors reach several units: the float32 sums differ from it by up to a few 1e-6)."""
    from dem_hf.merging.groups import coefficient_for

    state = untied_state_dict(AutoModelForCausalLM.from_pretrained(base_dir))
    expected = {}
    for name, tensor in state.items():
        value = tensor.double()
        for vector in vectors:
            if vector.changes(name):
                value = value + coefficient_for(coefficients[vector.name], name) * vector.delta(name).double()
        expected[name] = value
    return expected


def test_per_group_lora_merge_matches_torch_deltas(base_dir, peft_vectors):
    coefficients = {"rs": {"layer.0": 0.8, "*": -0.4}, "tied": {"embeddings": 1.5, "*": 0.6}}
    merger = DEMMerger.from_pretrained(base_dir, vectors=peft_vectors)
    merged = untied_state_dict(merger.merge(coefficients))
    for name, expected in dense_reference(base_dir, peft_vectors, coefficients).items():
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-5)
    saved = merger.save_pretrained(base_dir.parent / "merged", coefficients, card=False)  # the same engine: bit for bit
    assert all(torch.equal(merged[n], t) for n, t in untied_state_dict(AutoModelForCausalLM.from_pretrained(saved)).items())


def test_merge_command_of_lora_vectors_imports_no_torch(tmp_path, base_dir, peft_vectors):
    """`dem-hf merge` of saved LoRA vectors (rsLoRA with patterns, LoRA on tied embeddings) runs without torch, and
    writes the model PEFT's deltas give."""
    absent = ("torch", "transformers", "peft")
    vectors = [f"{vector.path}={weight}" for vector, weight in zip(peft_vectors, (0.7, -0.5))]
    code = (
        "import sys; from dem_hf.commands.cli import main; "
        f"code = main(['merge', '--base', {str(base_dir)!r}, '--vector', {vectors[0]!r}, '--vector', {vectors[1]!r}, "
        f"'--output', {str(tmp_path / 'out')!r}]); "
        f"print(code, sorted(m for m in {absent!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    in_memory = DEMMerger.from_pretrained(tmp_path / "out").merge()  # the same NumPy engine: bit for bit
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), in_memory.state_dict().values()))
    merged = untied_state_dict(saved)
    for name, expected in dense_reference(base_dir, peft_vectors, {"rs": 0.7, "tied": -0.5}).items():
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-5)


def test_lora_blocks_run_on_one_blas_thread(tmp_path, base_dir, peft_vectors, monkeypatch):
    """The merge runs its own worker threads: the BLAS under NumPy's matrix products is held to one thread meanwhile
    (its own threads on top made a LoRA merge 10x slower on a busy 2-core machine), and restored afterwards."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from dem_hf.vectors import vector as vector_module

    seen = []
    original = vector_module.add_lora_rows

    def recording(*args, **kwargs):
        seen.append({info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"})
        return original(*args, **kwargs)

    monkeypatch.setattr(vector_module, "add_lora_rows", recording)
    merger = DEMMerger.from_pretrained(base_dir, vectors=peft_vectors)
    with threadpool_limits(limits=2, user_api="blas"):
        merger.save_pretrained(tmp_path / "merged", {"rs": 0.5, "tied": 0.5}, card=False)
        merger.merge({"rs": 0.5, "tied": 0.5})
        assert {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"} == {2}
    assert seen and all(threads == {1} for threads in seen)


def test_a_whole_tensor_of_lora_rows_is_formed_in_bounded_pieces(monkeypatch):
    """TIES reads each delta whole: the product is formed a few rows at a time into a bounded scratch buffer, with
    the same values as one product."""
    from dem_hf.vectors import factors

    base, vectors = synthetic_world("BF16", "F32")
    operator = MergeOperator(method="ties", density=0.6)
    terms = [(v, WEIGHTS[v.name]) for v in vectors]
    expected = np.concatenate(list(merged_blocks(base, "w", terms, BufferPool(), BLOCK_VALUES, operator).blocks))
    monkeypatch.setattr(factors, "PRODUCT_VALUES", 50)  # two rows of 23 per product
    pool = BufferPool()
    actual = np.concatenate(list(merged_blocks(base, "w", terms, pool, BLOCK_VALUES, operator).blocks))
    np.testing.assert_array_equal(actual, expected)
    assert pool.take("lora_product", np.float32, 0).base.size <= 50
