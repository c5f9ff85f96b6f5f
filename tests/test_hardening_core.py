"""Bad or unusual input to generation, sampling, caches and speculative decoding:
clear library errors, nothing silently wrong."""

import math

import pytest
import torch
from conftest import scaled_model

from llmopt_lab import generate, preset
from llmopt_lab.cache import StaticCache, make_cache
from llmopt_lab.errors import CacheError, GenerationError
from llmopt_lab.speculative import speculative_generate


@pytest.fixture(scope="module")
def model():
    return scaled_model(preset("tiny"), seed=13)


@pytest.mark.parametrize("kind", ["static", "int8", "dynamic"])
def test_a_cache_that_already_holds_tokens_is_reset_not_mixed_in(model, kind):
    prompts = [[5, 9, 2, 7], [11, 3]]
    fresh = generate(model, prompts, 8, ignore_eos=True).tolist()
    cache = make_cache(kind, model.config, 2, 32)
    generate(model, [[100, 101, 102, 103, 104, 105], [200, 201, 202]], 8, ignore_eos=True, cache=cache)
    again = generate(model, prompts, 8, ignore_eos=True, cache=cache).tolist()
    if kind == "int8":  # lossy: compare with a fresh int8 cache
        fresh = generate(model, prompts, 8, ignore_eos=True, cache="int8").tolist()
    assert again == fresh
    assert cache.lengths.tolist() == [4 + 8, 2 + 8]  # left at each sequence's final length


def test_speculative_decoding_honours_a_list_of_eos_ids(model):
    draft = scaled_model(preset("tiny").replace(num_layers=1), seed=14)
    prompt = [5, 9, 2, 7]
    free = generate(model, [prompt], 12, ignore_eos=True).tolist()[0]
    stop = free[4]
    eos = [511, stop] if stop != 511 else [510, stop]
    want = generate(model, [prompt], 12, eos_token_id=eos).tolist()[0]
    assert want == free[:free.index(stop) + 1]
    for d in (draft, None):
        got = speculative_generate(model, d, [prompt], 12, k=3, eos_token_id=eos).tokens
        assert got == want


@pytest.mark.parametrize("ids", [[[1, 2, 512]], [[-1, 4]], [[3], [7, 9000]]])
def test_token_ids_outside_the_vocabulary(model, ids):
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(model, ids, 3)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        speculative_generate(model, None, ids, 3)


def test_a_prompt_beyond_the_drafts_smaller_vocabulary(model):
    small = scaled_model(preset("tiny").replace(vocab_size=256), seed=15)
    with pytest.raises(GenerationError, match="vocabulary of the draft"):
        speculative_generate(model, small, [[1, 300]], 3)


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature="0.7"), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature=1.0, top_p=math.nan), "top_p"),
    (dict(temperature=1.0, top_p="0.9"), "top_p"),
    (dict(temperature=1.0, top_k=True), "top_k"),
    (dict(temperature=1.0, seed="42"), "seed"),
    (dict(temperature=1.0, seed=1.5), "seed"),
])
def test_non_numeric_or_nan_sampling_arguments(model, kwargs, phrase):
    with pytest.raises(GenerationError, match=phrase):
        generate(model, [[1, 2, 3]], 4, **kwargs)


def test_truncate_refuses_negative_lengths_and_wrong_shapes(model):
    cache = StaticCache(model.config, 2, 16)
    with pytest.raises(CacheError, match="one length >= 0 per sequence"):
        cache.truncate(torch.tensor([3, -1]))
    with pytest.raises(CacheError, match="one length >= 0 per sequence"):
        cache.truncate(torch.tensor([3]))


@pytest.mark.parametrize("device, match", [
    ("mps", "not supported"), ("meta", "not supported"), ("xla", "not supported"),
    ("cpu:1", "single device 'cpu'"), ("tpu", "unknown device"),
])
def test_devices_other_than_cpu_and_cuda_are_refused(device, match):
    from llmopt_lab import load_model
    from llmopt_lab.errors import ModelLoadError
    from llmopt_lab.weights import resolve_device

    with pytest.raises(ModelLoadError, match=match):
        resolve_device(device)
    with pytest.raises(ModelLoadError, match=match):
        load_model("llmopt-tiny", device=device)


@pytest.mark.parametrize("kw", [dict(k_len=torch.tensor([-1])), dict(k_len=-2)])
def test_negative_lengths_to_the_flash_kernels_are_refused(kw):
    from llmopt_lab.kernels.flash_attention import flash_attention
    from llmopt_lab.kernels.flash_decode import flash_decode

    q, k, v = (torch.randn(1, 2, 8, 32) for _ in range(3))
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"{name} must be >= 0"):
        flash_attention(q, k, v, **kw)
    if name == "k_len":
        with pytest.raises(ValueError, match="k_len must be >= 0"):
            flash_decode(q[:, :, :1], k, v, **kw)


def test_a_transposed_int8_weight_is_named_as_such():
    from llmopt_lab.kernels.quant_matmul import int8_matmul

    W = torch.randint(-127, 127, (32, 64), dtype=torch.int8)  # (N, K): not K-major
    with pytest.raises(ValueError, match="looks transposed"):
        int8_matmul(torch.randn(1, 64), W, torch.ones(32))


@pytest.mark.parametrize("shape", [(2, 0), (0, 8)])
def test_calibration_batches_without_tokens_are_refused(shape):
    from llmopt_lab import load_model
    from llmopt_lab.errors import QuantizationError
    from llmopt_lab.transforms.quantize import quantize

    model, _ = load_model("llmopt-tiny", device="cpu")
    with pytest.raises(QuantizationError, match="holds no tokens"):
        quantize(model, "gptq", calibration=[torch.zeros(*shape, dtype=torch.long)], copy=True)


def test_a_notebook_that_is_not_json_is_named(tmp_path):
    from llmopt_lab.course.exercises import ExerciseFormatError, build

    (tmp_path / "sol").mkdir()
    (tmp_path / "sol" / "01_x.ipynb").write_text("not json {")
    with pytest.raises(ExerciseFormatError, match="01_x.ipynb is not a readable notebook"):
        build(tmp_path / "sol", tmp_path / "ex")


@pytest.mark.parametrize("kind", ["static", "int8"])
def test_writing_past_a_static_caches_capacity_is_refused(kind):
    from llmopt_lab import load_model
    from llmopt_lab.cache import make_cache
    from llmopt_lab.errors import CacheError

    model, _ = load_model("llmopt-tiny", device="cpu")
    cache = make_cache(kind, model.config, 1, 8, device="cpu")
    with pytest.raises(CacheError, match="limit of 8 positions"):
        model(torch.randint(0, 100, (1, 12)), cache=cache)
    model(torch.randint(0, 100, (1, 8)), cache=cache)  # exactly full is fine
    with pytest.raises(CacheError, match="up to position 8"):
        model(torch.randint(0, 100, (1, 1)), positions=torch.tensor([[8]]), cache=cache)
