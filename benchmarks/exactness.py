"""How far a benchmark's outputs are from the exact result, computed here in float64 from the inputs on disk.

The oracle never goes through the code under test: tensors are read with `CheckpointReader.get` (or safetensors for
PEFT adapters), the exact merge, delta or LoRA product is formed in float64 and rounded once to the output dtype. The
distance is the largest difference in units in the last place of the output dtype at the scale of the largest input or
result value at that position (a float32 computation rounds at the scale of its inputs, however much they cancel),
and how many values differ at all. Tensors are compared in blocks of rows, so a 7B embedding never needs gigabytes of
float64 at once.
"""

from __future__ import annotations

import filecmp
import json
from collections.abc import Callable
from pathlib import Path

import torch

from dem_hf.io.reader import CheckpointReader

ROWS_PER_BLOCK = 2048
# A few tensors of every kind a Llama has: embeddings, attention, MLP, the final norm, the head.
CHECKED_TENSORS = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.3.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
)


class Distance:
    """The largest ulp distance and the count of differing values, accumulated over blocks."""

    def __init__(self) -> None:
        self.worst, self.wrong, self.total = 0.0, 0, 0

    def add(self, result: torch.Tensor, exact: torch.Tensor, largest: torch.Tensor) -> None:
        """Compare `result` with `exact` (float64) rounded to `result`'s dtype, in ulps at the scale `largest`."""
        rounded = exact.to(result.dtype)
        scale = torch.maximum(rounded.abs(), largest.to(result.dtype))
        ulp = (torch.nextafter(scale, torch.full_like(scale, float("inf"))) - scale).to(torch.float64)
        difference = (result.to(torch.float64) - rounded.to(torch.float64)).abs()
        self.worst = max(self.worst, (difference / ulp).max().item())
        self.wrong += int((difference > 0).sum())
        self.total += result.numel()

    def __str__(self) -> str:
        return f"{self.worst:.2g} ulp, {self.wrong} of {self.total / 1e6:.1f}M values"


def row_blocks(rows: int):
    for start in range(0, rows, ROWS_PER_BLOCK):
        yield slice(start, min(start + ROWS_PER_BLOCK, rows))


def check_outputs(base_folder: Path, sources: dict[str, tuple[Path, float, bool]], outputs: dict[str, Path]) -> dict[str, str]:
    """Each merged output in `outputs` against base + Σ w·Δ over `CHECKED_TENSORS`.

    Args:
        base_folder: the base checkpoint.
        sources: `{name: (folder, weight, is_model)}`: a fine-tuned model (Δ = θ_ft − θ) or a saved full vector (Δ).
        outputs: `{contender: merged checkpoint folder}`.

    Returns:
        `{contender: distance}`; also logs whether the outputs are bitwise identical to the first one's.
    """
    base = CheckpointReader(base_folder)
    readers = {name: (CheckpointReader(folder, stem="model" if is_model else "vector"), weight, is_model)
               for name, (folder, weight, is_model) in sources.items()}
    distances = {contender: Distance() for contender in outputs}
    same = dict.fromkeys(outputs, True)
    for tensor in CHECKED_TENSORS:
        theta_all = base.get(tensor)
        inputs = {name: reader.get(tensor) for name, (reader, _, _) in readers.items()}
        merged = {contender: CheckpointReader(folder).get(tensor) for contender, folder in outputs.items()}
        for contender, result in merged.items():
            if result.dtype != theta_all.dtype:
                raise AssertionError(f"{contender} wrote {tensor} as {result.dtype}, base is {theta_all.dtype}")
            same[contender] &= torch.equal(result, next(iter(merged.values())))
        for rows in row_blocks(theta_all.shape[0]):
            theta = theta_all[rows].to(torch.float64)
            exact, largest = theta.clone(), theta.abs()
            for name, (_, weight, is_model) in readers.items():
                other = inputs[name][rows].to(torch.float64)
                term = weight * ((other - theta) if is_model else other)
                exact += term
                largest = torch.maximum(largest, (other if is_model else term).abs())
            for contender, result in merged.items():
                distances[contender].add(result[rows], exact, largest)
    if len(outputs) > 1:
        first, *others = outputs
        print(f"outputs bitwise identical to {first}'s over the checked tensors: "
              + ", ".join(f"{c} {'yes' if same[c] else 'NO'}" for c in others), flush=True)
    return {contender: str(distance) for contender, distance in distances.items()}


def check_extracted(base_folder: Path, finetuned_folder: Path, vector_folder: Path) -> str:
    """A saved full vector against θ_ft − θ computed in float64 and rounded once, over `CHECKED_TENSORS`."""
    base, tuned = CheckpointReader(base_folder), CheckpointReader(finetuned_folder)
    vector = CheckpointReader(vector_folder, stem="vector")
    distance = Distance()
    for tensor in CHECKED_TENSORS:
        theta, other, delta = base.get(tensor), tuned.get(tensor), vector.get(tensor)
        for rows in row_blocks(theta.shape[0]):
            exact = other[rows].to(torch.float64) - theta[rows].to(torch.float64)
            distance.add(delta[rows], exact, exact.abs())
    return str(distance)


def check_same_files(expected: Path, outputs: dict[str, Path]) -> dict[str, str]:
    """Whether each output folder holds, byte for byte, the files of `expected`."""
    names = sorted(p.name for p in expected.iterdir())
    result = {}
    for contender, out in outputs.items():
        same = sorted(p.name for p in out.iterdir()) == names and filecmp.cmpfiles(out, expected, names, shallow=False)[0] == names
        result[contender] = f"files {'identical' if same else 'DIFFERENT'} to {expected.name}"
    return result


def lora_terms(adapter: Path, weight: float) -> Callable[[str, slice], torch.Tensor | None]:
    """`(base tensor name, rows) -> weight · scaling · B[rows] @ A` in float64 for a PEFT adapter folder, read with
    safetensors and its `adapter_config.json` (scaling = lora_alpha / r); `None` for tensors it does not adapt."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    state = load_file(adapter / "adapter_model.safetensors")

    def term(name: str, rows: slice) -> torch.Tensor | None:
        module = "base_model.model." + name.removesuffix(".weight")
        if module + ".lora_A.weight" not in state:
            return None
        a, b = state[module + ".lora_A.weight"].to(torch.float64), state[module + ".lora_B.weight"].to(torch.float64)
        return weight * scaling * (b[rows] @ a)

    return term


def check_lora_merge(base_folder: Path, adapters: dict[Path, float], output: Path, tensors: list[str]) -> str:
    """A merged checkpoint against base + Σ w·scaling·B·A over `tensors` (adapted ones and untouched ones)."""
    base, merged = CheckpointReader(base_folder), CheckpointReader(output)
    terms = [lora_terms(adapter, weight) for adapter, weight in adapters.items()]
    distance = Distance()
    for tensor in tensors:
        theta_all, result = base.get(tensor), merged.get(tensor)
        for rows in row_blocks(theta_all.shape[0]):
            exact = theta_all[rows].to(torch.float64)
            largest = exact.abs()
            for term in terms:
                value = term(tensor, rows)
                if value is not None:
                    exact = exact + value
                    largest = torch.maximum(largest, value.abs())
            distance.add(result[rows], exact, largest)
    return str(distance)
