"""Search and evaluation beyond one CPU (issue 17): the accelerator by default, low-precision models kept exact,
token-budgeted batches, models split over several devices, and data-parallel evaluation across processes.

No GPU here: the device choice is tested by faking `torch.cuda`, several devices by accelerate's hooks plus a fake
device per tensor, and data parallelism by two gloo processes on the CPU."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from accelerate import cpu_offload, dispatch_model
from peft import LoraConfig, get_peft_model

from dem_hf import DEMConfig, DEMMerger, DistributionVector, SearchConfig
from dem_hf.evaluation.perplexity import compute_perplexities, tokenize_for_evaluation
from dem_hf.evaluation.sets import batch_spans
from dem_hf.io.tensors import TensorDict, untied_state_dict
from dem_hf.search import candidates as candidates_module
from dem_hf.search import run as search_module
from dem_hf.search.candidates import CandidateModel

from .conftest import make_llama, make_tokenizer, save_model


def noise_vector(name: str, seed: int, scale: float = 0.1) -> DistributionVector:
    state = untied_state_dict(make_llama(seed=0))
    generator = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(t.shape, generator=generator) * scale for n, t in state.items() if t.dtype.is_floating_point}
    return DistributionVector(name, TensorDict(deltas))


def lora_vector(name: str, seed: int) -> DistributionVector:
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return DistributionVector.from_peft(get_peft_model(make_llama(seed=0), config), name=name)


def texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(60)}" for _ in range(rng.randint(2, 18))) for _ in range(count)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accel")
    tokenizer = make_tokenizer()
    base = save_model(make_llama(seed=0), tmp / "base", tokenizer)
    sets = {"math": tokenize_for_evaluation(texts(11, 1), tokenizer), "chat": tokenize_for_evaluation(texts(1, 2), tokenizer)}
    return dict(tmp=tmp, tokenizer=tokenizer, base=base, sets=sets)


def new_merger(world, vectors=None) -> DEMMerger:
    vectors = vectors if vectors is not None else [noise_vector("math", 1), noise_vector("chat", 2)]
    return DEMMerger.from_pretrained(world["base"], vectors=vectors, config=DEMConfig())


# ---------------------------------------------------------------------------------------------- device and dtype


def test_the_accelerator_is_the_default_device(monkeypatch):
    """Issue 17: no device given means CUDA (this process's GPU under a launcher), then MPS, then the CPU; "cpu"
    still means the CPU."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert search_module.resolve_device(None) == search_module.resolve_device("auto") == torch.device("cuda", 0)
    assert search_module.resolve_device("cpu") == torch.device("cpu")
    assert search_module.resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert search_module.resolve_device(None) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert search_module.resolve_device(None) == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert search_module.resolve_device(None) == torch.device("cpu")


def test_bf16_where_the_hardware_has_it(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert search_module.resolve_dtype("auto", cuda) is torch.bfloat16
    assert search_module.resolve_dtype("auto", cpu) == "auto"  # the checkpoint's dtype
    assert search_module.resolve_dtype("float32", cuda) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert search_module.resolve_dtype("auto", cuda) == "auto"
    assert search_module.resolve_dtype("float16", cpu) is torch.float16


def test_search_model_loads_on_the_resolved_device_and_dtype(world, monkeypatch):
    merger = new_merger(world)
    asked = []
    monkeypatch.setattr(search_module, "resolve_device", lambda device: asked.append(device) or torch.device("cpu"))
    model = search_module.load_search_model(merger, SearchConfig())
    assert asked == [None] and {p.dtype for p in model.parameters()} == {torch.float32} and not model.training
    model = search_module.load_search_model(merger, SearchConfig(device="cpu", dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bf16_model_from_a_float32_checkpoint_switches_from_the_exact_base(world):
    """A base loaded in bf16 from a float32 checkpoint keeps float32 masters taken from the checkpoint (not from
    its rounded weights): each candidate is the fresh float32 merge rounded once, and restore gives the loaded
    bf16 base back bit for bit."""
    merger = new_merger(world)
    model = search_module.load_search_model(merger, SearchConfig(device="cpu", dtype="bfloat16"))
    loaded = {n: t.clone() for n, t in untied_state_dict(model).items()}
    vectors = list(merger.vectors.values())
    with CandidateModel(model, merger.base, vectors) as switcher:
        for weights in ([0.3, 0.9], [1.1, -0.2], [0.6, 1.3]):
            switcher.set_weights(weights)
        fresh = untied_state_dict(merger.merge({"math": 0.6, "chat": 1.3}))
        for name, unit in switcher.units.items():
            torch.testing.assert_close(unit.master, fresh[name], rtol=1e-6, atol=1e-6)
            assert torch.equal(unit.tensor, unit.master.to(torch.bfloat16)), name
    assert all(torch.equal(t, loaded[n]) for n, t in untied_state_dict(model).items())
    assert all(torch.equal(unit.master, merger.base.get(n)) for n, unit in switcher.units.items())


# ---------------------------------------------------------------------------------------------- token budgets


def test_batch_spans_respect_the_token_budget():
    assert batch_spans([9, 5, 4, 4, 2], batch_size=8, max_tokens=12) == [(0, 1), (1, 3), (3, 5)]
    assert batch_spans([30, 3], batch_size=8, max_tokens=10) == [(0, 1), (1, 2)]  # too long: alone
    assert batch_spans([3, 2, 1], batch_size=2) == [(0, 2), (2, 3)]
    rng = random.Random(0)
    for _ in range(50):
        lengths = sorted((rng.randint(1, 40) for _ in range(rng.randint(1, 30))), reverse=True)
        budget = rng.randint(1, 120)
        spans = batch_spans(lengths, 8, budget)
        assert [i for a, b in spans for i in range(a, b)] == list(range(len(lengths)))
        assert all(b - a == 1 or (b - a) * lengths[a] <= budget for a, b in spans)
        assert all(b == len(lengths) or (b - a + 1) * lengths[a] > budget for a, b in spans)  # as full as allowed


def test_token_budgeted_batches_give_the_same_perplexity_and_search(world):
    model = make_llama(seed=0)
    sets = world["sets"]
    by_size = compute_perplexities(model, sets, batch_size=3, show_progress=False)
    for budget in (1, 20, 64, 10_000):
        batches = sets["math"].batches(max_tokens=budget)
        assert all(len(b.input_ids) == 1 or b.input_ids.numel() <= budget for b in batches)
        by_tokens = compute_perplexities(model, sets, batch_tokens=budget, show_progress=False)
        for name in sets:
            assert by_tokens[name].loss == pytest.approx(by_size[name].loss, rel=1e-6)
    for strategy, options in (("grid", dict(grid_values=[0.0, 0.8])), ("gradient", dict(gradient_steps=3))):
        runs = [new_merger(world).search(sets, SearchConfig(strategy=strategy, device="cpu", **options, **batching),
                                         show_progress=False) for batching in (dict(batch_size=2), dict(batch_tokens=40))]
        objectives = [[c.objective for c in run.candidates] for run in runs]
        assert objectives[0] == pytest.approx(objectives[1], rel=1e-5)


# ---------------------------------------------------------------------------------------------- several devices


SECOND_DEVICE = torch.device("cpu", 1)  # a stand-in second device: tensors "there" are CPU tensors


def split_over_two_devices(model, monkeypatch) -> dict[str, torch.device]:
    """Dispatch `model` with accelerate (hooks per block, as `device_map` loading adds) and make CandidateModel see
    the second block and the head on a second device; returns the device of every tensor name."""
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    dispatch_model(model, device_map=device_map, main_device="cpu", force_hooks=True)
    placement = {
        name: SECOND_DEVICE if name.startswith(("model.layers.1.", "model.norm.", "lm_head.")) else torch.device("cpu", 0)
        for name in untied_state_dict(model)
    }
    by_storage = {t.data_ptr(): placement[n] for n, t in untied_state_dict(model).items()}
    monkeypatch.setattr(candidates_module, "tensor_device", lambda tensor: by_storage.get(tensor.data_ptr(), tensor.device))
    return placement


@pytest.mark.parametrize("lora_mode", ["adapter", "update"])
def test_model_split_over_two_devices_switches_exactly(world, monkeypatch, lora_mode):
    """Acceptance 1: with parameters spread over two devices (accelerate hooks, and a device per tensor), every
    tensor is switched on its own device, the parameters equal a fresh merge of the last candidate, and restore
    gives the base back bit for bit."""
    monkeypatch.setattr(candidates_module, "RESYNC_EVERY", 4)
    vectors = [noise_vector("math", 1), noise_vector("chat", 2), lora_vector("code", 3)]
    merger = new_merger(world, vectors)
    model = make_llama(seed=0)
    placement = split_over_two_devices(model, monkeypatch)
    base = {n: t.clone() for n, t in untied_state_dict(model).items()}
    asked: list[tuple[str, torch.device]] = []  # (tensor, device) of every checkpoint read and LoRA factor
    for method in ("_base_float32", "_factors"):
        original = getattr(CandidateModel, method)

        def spy(self, *args, _original=original):
            asked.append((args[-2], args[-1]))
            return _original(self, *args)

        monkeypatch.setattr(CandidateModel, method, spy)
    ids = torch.tensor([[2, 7, 9, 30, 3, 11], [2, 40, 41, 42, 43, 3]])
    rng = random.Random(2)
    with CandidateModel(model, merger.base, vectors, lora_mode=lora_mode, cache_deltas=lora_mode == "adapter") as switcher:
        assert {u.device for u in switcher.units.values()} == {torch.device("cpu", 0), SECOND_DEVICE}
        assert all(u.device == placement[n] for n, u in switcher.units.items())
        for _ in range(9):
            coefficients = {n: rng.choice([0.0, 0.4, 1.0, -0.6, 1.3]) for n in merger.vector_names}
            switcher.set_weights([coefficients[n] for n in merger.vector_names])
        fresh = merger.merge(coefficients)
        merged = untied_state_dict(fresh)
        # Adapter hooks serve the LoRA vector beside its layers: their weights hold the dense vectors' merge only.
        dense_only = untied_state_dict(merger.merge({**coefficients, "code": 0.0}))
        hooked = set(vectors[2].lora_modules) if lora_mode == "adapter" else set()
        assert switcher.adapter_count == len(hooked)
        for name, tensor in untied_state_dict(model).items():
            torch.testing.assert_close(tensor, (dense_only if name in hooked else merged)[name], rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, fresh(ids).logits, rtol=1e-4, atol=1e-5)
    assert asked and all(device == placement[name] for name, device in asked)
    assert all(torch.equal(t, base[n]) for n, t in untied_state_dict(model).items())


def test_offloaded_parameters_are_refused(world):
    """Parameters offloaded by accelerate live in a hook's weights_map (the module's are on `meta`): in-place
    switching cannot reach them, so they are refused before anything changes."""
    merger = new_merger(world)
    model = cpu_offload(make_llama(seed=0), execution_device="cpu")
    with pytest.raises(ValueError, match="offloaded by accelerate"):
        CandidateModel(model, merger.base, list(merger.vectors.values()))


# ---------------------------------------------------------------------------------------------- data parallel


SEARCHES = {
    "grid": dict(strategy="grid", grid_values=[0.0, 0.7, 1.4]),
    "gradient": dict(strategy="gradient", gradient_steps=3, initial_coefficients={"math": 1.0, "chat": 1.0}),
}


def evaluate_and_search(base: str, sets: dict) -> dict:
    """What every process computes: the perplexities, and a grid and a gradient search (their whole paths)."""
    vectors = [noise_vector("math", 1), noise_vector("chat", 2)]
    model = make_llama(seed=0)
    seen = []  # sequences this process scored
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(len(kwargs["input_ids"])), with_kwargs=True)
    out = {"losses": {n: r.loss for n, r in compute_perplexities(model, sets, batch_size=2, show_progress=False).items()}}
    out["sequences"] = sum(seen)
    for name, options in SEARCHES.items():
        merger = DEMMerger.from_pretrained(base, vectors=vectors, config=DEMConfig())
        result = merger.search(sets, SearchConfig(device="cpu", batch_size=2, **options), show_progress=False)
        out[name] = {"objectives": [c.objective for c in result.candidates],
                     "coefficients": [c.coefficients for c in result.candidates],
                     "gradients": [c.gradient for c in result.candidates],
                     "best": result.best_coefficients}
    return out


def _data_parallel_worker(rank: int, world_size: int, init_file: str, base: str, sets: dict, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        Path(out, f"rank{rank}.json").write_text(json.dumps(evaluate_and_search(base, sets)))
    finally:
        torch.distributed.destroy_process_group()


def test_a_launched_search_forms_the_process_group(monkeypatch):
    """Under `accelerate launch` (WORLD_SIZE > 1) with no group yet, the search forms it with PartialState."""
    import accelerate

    formed = []
    monkeypatch.setattr(accelerate, "PartialState", lambda: formed.append(True))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    for world_size, expected in (("1", []), ("2", [True])):
        monkeypatch.setenv("WORLD_SIZE", world_size)
        search_module.join_launched_processes()
        assert formed == expected


def test_data_parallel_evaluation_matches_one_process(world, tmp_path):
    """Acceptance 1: two gloo processes each score half of every set's sequences (one set has a single sequence,
    so one process scores none of it); the all-reduced perplexities equal one process's, and both processes follow
    the same search path to the same coefficients."""
    single = evaluate_and_search(str(world["base"]), world["sets"])
    mp.spawn(_data_parallel_worker, args=(2, str(tmp_path / "init"), str(world["base"]), world["sets"], str(tmp_path)),
             nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert single.pop("sequences") == 12 and [r.pop("sequences") for r in ranks] == [6 + 1, 5]  # split by sequence
    assert ranks[0] == ranks[1]  # the same bits on every process
    assert ranks[0]["losses"] == pytest.approx(single["losses"], rel=1e-6)
    for name in SEARCHES:
        assert ranks[0][name]["objectives"] == pytest.approx(single[name]["objectives"], rel=1e-5)
        assert ranks[0][name]["coefficients"] == (single[name]["coefficients"] if name == "grid" else ranks[0][name]["coefficients"])
        assert json.dumps(ranks[0][name]["best"]) == json.dumps(ranks[1][name]["best"])
    for left, right in zip(ranks[0]["gradient"]["gradients"], single["gradient"]["gradients"]):
        assert left == pytest.approx(right, rel=1e-4, abs=1e-6)
    assert ranks[0]["gradient"]["best"] == pytest.approx(single["gradient"]["best"], abs=1e-4)
