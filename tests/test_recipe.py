"""Issue 23: :class:`Recipe`, the record of a deployment's optimizations.

Every illegal combination is refused by the right error class with the
reason in the message; a recipe survives JSON and files unchanged; saving
never clobbers a file unless asked; build() never touches the caller's model.
"""

import json
import os

import pytest
import torch
import torch.nn as nn
from conftest import scaled_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmopt_lab import Engine, Recipe, SamplingParams, generate, preset  # noqa: E402
from llmopt_lab.cache.pool import Int8KVPool  # noqa: E402
from llmopt_lab.errors import (LlmoptError, ParallelError, PruningError,  # noqa: E402
                               QuantizationError, ServingError)
from llmopt_lab.parallel import Comm  # noqa: E402
from llmopt_lab.transforms.quantize import Int8Linear, W8A8Linear  # noqa: E402

TINY = preset("tiny")  # hidden 128, 4 heads, 2 KV heads, MLP 384, vocab 512, context 1024


@pytest.fixture(scope="module")
def model():
    return scaled_model(preset("tiny"), seed=3)


# ------------------------------------------------------------- validation
INVALID = [
    # weights
    (Recipe(weights="int5"), TINY, QuantizationError, "unknown quantization method 'int5'"),
    (Recipe(weights="int8", weight_options={"alpha": 0.5}), TINY, QuantizationError,
     "unknown option"),
    (Recipe(weights="int4", weight_options={"group_size": 48}), TINY, QuantizationError,
     "group_size must be one of"),
    (Recipe(weights="int4", weight_options={"group_size": 256}), TINY, QuantizationError,
     "in_features 128 is not a multiple of group_size 256"),
    (Recipe(weights="int8", weight_options={"group_size": 64}), None, QuantizationError,
     "group_size applies to the int4-format methods"),
    (Recipe(weight_options={"group_size": 64}), None, QuantizationError, "weights is None"),
    # pruning
    (Recipe(pruning="random"), None, PruningError, "unknown pruning method"),
    (Recipe(pruning="magnitude", pruning_options={"sparsity": 1.5}), None, PruningError,
     "sparsity is the fraction"),
    (Recipe(pruning="magnitude", pruning_options={"pattern": "2:3"}), TINY, PruningError,
     "not a multiple of 3"),
    # tensor parallelism (the shape rules of parallel/tensor.py)
    (Recipe(tp=0), None, ParallelError, "positive integer"),
    (Recipe(tp=2), TINY, ParallelError, "build() in one process cannot do: run it under launch()"),
    (Recipe(tp=3), TINY, ParallelError, "vocabulary of 512 does not split"),
    (Recipe(tp=2), TINY.replace(num_heads=3, num_kv_heads=1, head_dim=32), ParallelError,
     "3 query heads cannot be split over 2 ranks"),
    (Recipe(tp=2), TINY.replace(num_heads=6, num_kv_heads=3, head_dim=32), ParallelError,
     "3 KV heads cannot be split or replicated"),
    (Recipe(tp=4), TINY.replace(intermediate_size=102), ParallelError,
     "MLP width does not split"),
    (Recipe(weights="int4", weight_options={"group_size": 128}, tp=2), TINY, ParallelError,
     "a row-parallel slice would cut an int4 group"),
    (Recipe(weights="w8a8", tp=2), None, ParallelError,
     "cannot slice the layers of weight method 'w8a8'"),
    # engine options
    (Recipe(kv_dtype="fp8"), None, ServingError, "kv_dtype must be 'auto' or 'int8'"),
    (Recipe(block_size=0), None, ServingError, "block_size"),
    (Recipe(block_size=2048), TINY, ServingError, "exceeds the model's context of 1024"),
    (Recipe(num_blocks=8, kv_bytes=2**20), None, ServingError, "not both"),
    (Recipe(policy="fifo"), None, ServingError, "unknown batching policy 'fifo'"),
    (Recipe(policy="static", chunked_prefill=True), None, ServingError,
     "chunked prefill needs the continuous policy"),
    (Recipe(max_num_seqs=0), None, ServingError, "max_num_seqs must be a positive integer"),
    (Recipe(prefix_caching="yes"), None, ServingError, "prefix_caching must be True or False"),
    # not inside the engine yet: said explicitly
    (Recipe(speculative={"draft": "llmopt-tiny-draft", "k": 4}), None, ServingError,
     "speculative decoding runs through speculative_generate; inside the Engine it is not "
     "supported yet"),
    (Recipe(speculative={"k": 4}), None, ServingError, "speculative must be None or a dict"),
    (Recipe(speculative={"draft": "prompt_lookup", "k": 0}), None, ServingError,
     "speculative['k'] must be a positive integer"),
    (Recipe(compile=True), None, ServingError, "torch.compile of the Engine's step is not supported"),
]


@pytest.mark.parametrize("recipe, config, error, phrase", INVALID,
                         ids=[f"{i}-{p[:30]}" for i, (_, _, _, p) in enumerate(INVALID)])
def test_invalid_combinations_are_refused_with_the_reason(recipe, config, error, phrase):
    with pytest.raises(error) as info:
        recipe.validate(config, device="cpu")
    assert phrase in str(info.value)
    assert isinstance(info.value, LlmoptError)  # the command line prints one line


def test_cuda_graphs_need_a_cuda_device():
    with pytest.raises(ServingError, match="cuda_graph=True needs a CUDA GPU"):
        Recipe(cuda_graph=True).validate(TINY, device="cpu")


def test_a_process_group_of_the_wrong_size_is_refused():
    with pytest.raises(ParallelError, match="tp=2 but the process group has 1 processes"):
        Recipe(tp=2).validate(TINY, comm=Comm.single())
    with pytest.raises(ParallelError, match="must be a llmopt_lab.parallel.Comm"):
        Recipe(tp=2).validate(TINY, comm="gloo")


def test_valid_recipes_pass_and_shape_rules_pass_before_the_launch_rule():
    for recipe in (Recipe(), Recipe(weights="int8", kv_dtype="int8", prefix_caching=True),
                   Recipe(weights="int4", weight_options={"group_size": 64}, policy="static"),
                   Recipe(pruning="magnitude", pruning_options={"pattern": "2:4"}),
                   Recipe(weights="gptq", weight_options={"group_size": 32, "damp": 0.02})):
        assert recipe.validate(TINY, device="cpu") is recipe
    # int4 g64 at tp=2 (64 input features per rank: whole groups) and 4 ranks
    # replicating tiny's 2 KV heads: every shape rule passes; only the launch is missing
    for recipe in (Recipe(weights="int4", weight_options={"group_size": 64}, tp=2),
                   Recipe(weights="int8", tp=4)):
        with pytest.raises(ParallelError, match="run it under launch"):
            recipe.validate(TINY, device="cpu")


# ------------------------------------------------------------------ JSON
def _everything() -> Recipe:
    return Recipe(weights="int4", weight_options={"group_size": 64, "bits": 4}, pruning="magnitude",
                  pruning_options={"sparsity": 0.25}, kv_dtype="int8", block_size=8,
                  num_blocks=100, prefix_caching=True, speculative={"draft": "prompt_lookup", "k": 3},
                  policy="continuous", max_num_seqs=4, max_num_batched_tokens=64,
                  chunked_prefill=True, max_wait_s=0.01, cuda_graph=True, compile=True, tp=2)


def test_json_round_trip_keeps_every_field():
    for recipe in (Recipe(), _everything()):
        text = recipe.to_json()
        d = json.loads(text)
        assert d["format"] == "llmopt-recipe" and d["version"] == 1
        assert Recipe.from_json(text) == recipe
        assert Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("text, phrase", [
    ("not json", "must be JSON"),
    ("[1, 2]", "a recipe is a JSON object"),
    ('{"format": "other", "version": 1}', "not a recipe"),
    ('{"format": "llmopt-recipe", "version": 9}', "version 9 is not supported"),
    ('{"format": "llmopt-recipe", "version": 1, "speed": "max"}', "unknown recipe field(s) speed"),
    ('{"format": "llmopt-recipe", "version": 1, "weights": "int5"}', "unknown quantization method"),
])
def test_from_json_refuses_what_is_not_a_recipe(text, phrase):
    with pytest.raises(LlmoptError) as info:
        Recipe.from_json(text)
    assert phrase in str(info.value)


def test_options_that_are_not_json_are_refused():
    with pytest.raises(ServingError, match="cannot be written as JSON"):
        Recipe(weights="smoothquant", weight_options={"alpha": torch.tensor(0.5)}).to_json()


def test_save_load_and_refuse_to_overwrite(tmp_path):
    path = tmp_path / "deploy.json"
    recipe = _everything()
    assert recipe.save(path) == path
    assert Recipe.load(path) == recipe
    before = path.read_bytes()
    with pytest.raises(ServingError, match="exists; pass overwrite=True"):
        Recipe().save(path)
    assert path.read_bytes() == before  # untouched
    Recipe().save(path, overwrite=True)
    assert Recipe.load(path) == Recipe()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy.json"]  # no temporary left
    with pytest.raises(ServingError, match="no recipe file"):
        Recipe.load(tmp_path / "missing.json")
    with pytest.raises(ServingError, match="does not exist"):
        Recipe().save(tmp_path / "no" / "such" / "folder.json")


# ----------------------------------------------------------------- build
def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()})


def _same(model, snap) -> bool:
    state, types = snap
    now = model.state_dict()
    return (now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
            and {n: type(m) for n, m in model.named_modules()} == types)


@pytest.mark.parametrize("recipe", [
    Recipe(weights="int8", pruning="magnitude", pruning_options={"sparsity": 0.3}),
    Recipe(weights="smoothquant", weight_options={"alpha": 0.5}),  # rescales norms in place
    Recipe(weights="w8a8", kv_dtype="int8"),
], ids=["prune+int8", "smoothquant", "w8a8"])
def test_build_never_modifies_the_callers_model(model, recipe):
    snap = _snapshot(model)
    calib = [torch.randint(1, 512, (2, 16), generator=torch.Generator().manual_seed(0))]
    served, engine = recipe.build(model, calibration=calib)
    assert _same(model, snap), "build() changed the caller's model"
    assert not hasattr(model, "quantization")
    assert served is not model and isinstance(engine, Engine) and engine.model is served
    assert type(served.layers[0].mlp.up_proj) in (Int8Linear, W8A8Linear)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    if recipe.pruning:  # pruned before quantizing: about 30% of the int8 codes are zero
        q = served.layers[0].mlp.up_proj.qweight_t
        assert 0.25 < float((q == 0).float().mean()) < 0.35


def test_build_passes_the_runtime_options_to_the_engine(model):
    recipe = Recipe(kv_dtype="int8", block_size=8, num_blocks=40, prefix_caching=True,
                    policy="static", max_num_seqs=3)
    served, engine = recipe.build(model)
    assert served is model  # nothing to transform: no copy
    assert (engine.block_size, engine.num_blocks, engine.prefix_caching) == (8, 40, True)
    assert engine.scheduler_config.policy == "static" and engine.scheduler_config.max_num_seqs == 3
    assert not engine.scheduler_config.chunked_prefill
    assert isinstance(engine.runner.pool, Int8KVPool)
    out = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert out[0].token_ids == generate(model, [[5, 6, 7]], 4, ignore_eos=True,
                                        cache="int8").tolist()[0]


def test_build_checks_before_working(model):
    with pytest.raises(ServingError, match="llmopt_lab Transformer"):
        Recipe().build(nn.Linear(2, 2))
    with pytest.raises(QuantizationError, match="calibration"):
        Recipe(weights="gptq", weight_options={"group_size": 64}).build(model)  # no calibration
    with pytest.raises(ParallelError, match="run it under launch"):
        Recipe(weights="int8", tp=2).build(model)
