"""More bad input, each refused with a library error that names the value and
the fix: quantized checkpoints, prompts that are not token ids, stop ids,
speculative decoding's arguments, cache positions and capacity, calibration
data given to the model-level quantizers, paged-attention ranges, and the
command line (non-zero exit, one line on stderr)."""

import json

import pytest
import torch
from conftest import scaled_model
from safetensors.torch import load_file, save_file

from llmopt_lab import Transformer, generate, preset, save_model
from llmopt_lab.cache import DynamicCache, Int8Cache, KVPool, StaticCache, make_cache
from llmopt_lab.errors import CacheError, ConfigError, GenerationError, ModelLoadError, QuantizationError
from llmopt_lab.speculative import speculative_generate
from llmopt_lab.step import host_step, run_step

CACHES = {"static": StaticCache, "int8": Int8Cache}


@pytest.fixture(scope="module")
def model():
    return scaled_model(preset("tiny"), seed=13)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("more") / "ckpt"
    save_model(Transformer.from_config(preset("tiny"), seed=1), folder)
    return folder


def _rewrite(saved, tmp_path, key, fn):
    import shutil

    folder = shutil.copytree(saved, tmp_path / "c")
    state = load_file(str(folder / "model.safetensors"))
    state[key] = fn(state[key])
    save_file(state, str(folder / "model.safetensors"))
    return folder


# ============================================================ loading: quantized checkpoints
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool,
                                   torch.float8_e4m3fn])
def test_integer_or_float8_tensors_in_a_checkpoint_are_refused_not_cast(saved, tmp_path, dtype):
    from llmopt_lab import load_model

    key = "model.layers.0.mlp.up_proj.weight"
    folder = _rewrite(saved, tmp_path, key, lambda w: (w * 100).round().to(dtype))
    with pytest.raises(ModelLoadError, match=rf"layers\.0\.mlp\.up_proj\.weight.*model\.safetensors.*"
                                             rf"{str(dtype).split('.')[-1]}.*quantize") as e:
        load_model(folder, device="cpu")
    assert "\n" not in str(e.value)


def test_float64_tensors_still_load(saved, tmp_path):
    from llmopt_lab import load_model

    key = "model.norm.weight"
    folder = _rewrite(saved, tmp_path, key, lambda w: w.double())
    model, _ = load_model(folder, device="cpu")
    assert model.norm.weight.dtype == torch.float32


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes"])
def test_a_config_with_a_quantization_config_is_refused(saved, tmp_path, method):
    import shutil

    from llmopt_lab import load_model

    folder = shutil.copytree(saved, tmp_path / "q")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=f"quantized checkpoint.*{method}"):
        load_model(folder, device="cpu")


# ============================================================ generation: what a prompt is
BAD_PROMPTS = [
    (torch.tensor([[1.0, 2.0]]), None, "integer token ids"),
    ([[1.5, 2]], None, "integer token ids"),
    (torch.tensor([[True, False]]), None, "integer token ids"),
    ("hello", None, "tokenize it first"),
    (["hello", "world"], None, "tokenize it first"),
    ({"ids": [[1, 2]]}, None, "must hold 'input_ids'"),
    (7, None, "a tensor or a list"),
    ([[1, 2, 3], [4]], torch.ones(2, 3), "padded \\(B, T\\)"),
]


@pytest.mark.parametrize("ids, mask, phrase", BAD_PROMPTS)
def test_prompts_that_are_not_integer_token_ids_are_refused(model, ids, mask, phrase):
    with pytest.raises(GenerationError, match=phrase):
        generate(model, ids, 3, attention_mask=mask)
    with pytest.raises(GenerationError, match=phrase):
        speculative_generate(model, None, ids, 3, attention_mask=mask)


def test_a_flat_list_of_ids_is_one_prompt_like_a_1d_tensor(model):
    prompt = [5, 9, 2, 7]
    got = generate(model, prompt, 4, ignore_eos=True).tolist()
    assert got == generate(model, torch.tensor(prompt), 4, ignore_eos=True).tolist()
    assert len(got) == 1


@pytest.mark.parametrize("eos", ["x", 2.5, -1, True, [1, "a"]])
def test_stop_ids_that_are_not_token_ids_are_refused(model, eos):
    with pytest.raises(GenerationError, match="eos_token_id.*token id >= 0"):
        generate(model, [[1, 2]], 3, eos_token_id=eos)
    with pytest.raises(GenerationError, match="eos_token_id must be a token id >= 0"):
        speculative_generate(model, None, [[1, 2]], 3, eos_token_id=eos)


def test_a_padded_batch_with_a_mask_gives_speculative_rows_what_they_get_alone(model):
    ids = torch.tensor([[0, 0, 5, 9, 2, 7], [11, 3, 4, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    got = speculative_generate(model, None, ids, 5, attention_mask=mask, ignore_eos=True).sequences
    alone = [speculative_generate(model, None, [p], 5, ignore_eos=True).tokens
             for p in ([5, 9, 2, 7], [11, 3, 4])]
    assert got == alone


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(draft="draft-model"), "draft must be a model"),
    (dict(seed="1", temperature=1.0), "seed must be an integer"),
    (dict(k=True), "k must be an integer >= 1"),
    (dict(k=0), "k must be an integer >= 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=True), "max_new_tokens must be a positive integer, got True"),
])
def test_bad_speculative_arguments(model, kwargs, phrase):
    kw = dict(draft=None, max_new_tokens=3)
    kw.update(kwargs)
    draft, n = kw.pop("draft"), kw.pop("max_new_tokens")
    with pytest.raises(GenerationError, match=phrase):
        speculative_generate(model, draft, [[1, 2]], n, **kw)


# ============================================================ caches: positions and capacity
@pytest.mark.parametrize("kind", ["static", "int8"])
@pytest.mark.parametrize("positions, phrase", [
    (torch.tensor([[0], [-1]]), "positions must be >= 0, got -1"),
    (torch.tensor([[0]]), r"positions must be a \(2, 1\) integer tensor"),
    (torch.tensor([[0.0], [1.0]]), r"positions must be a \(2, 1\) integer tensor"),
])
def test_positions_that_would_write_into_another_sequence_are_refused(model, kind, positions, phrase):
    cache = CACHES[kind](model.config, 2, 8)
    with pytest.raises(CacheError, match=phrase):
        model(torch.zeros(2, 1, dtype=torch.long), positions, cache=cache)
    assert cache.lengths.tolist() == [0, 0]  # nothing written


@pytest.mark.parametrize("kind", ["static", "int8"])
def test_advancing_a_decode_step_past_the_cache_is_refused(model, kind):
    cache = CACHES[kind](model.config, 2, 4)
    run_step(model, cache, host_step([[1, 2, 3], [4, 5]], [0, 0], [[0], [1]], 4,
                                     contiguous=True).to_step())
    step = host_step([[7], [8]], [3, 2], [[0], [1]], 4, contiguous=True).to_step()
    run_step(model, cache, step)  # row 0 now fills its 4 slots
    before = [t.clone() for t in cache.k]
    with pytest.raises(CacheError, match="would write position 4, past the cache's 4 slots"):
        step.advance(torch.tensor([9, 9]))  # row 0 would write into row 1's first slot
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k))
    assert step.positions.tolist() == [3, 2]  # the step is left as it was


def test_generate_advances_to_exactly_the_caches_capacity(model):
    cache = make_cache("static", model.config, 1, 7)
    out = generate(model, [[1, 2, 3]], 4, ignore_eos=True, cache=cache)  # 3 + 4 = 7 slots
    assert out.tolist() == generate(model, [[1, 2, 3]], 4, ignore_eos=True).tolist()


@pytest.mark.parametrize("make, phrase", [
    (lambda c: StaticCache(c, 0, 4), "batch_size and max_len must be positive integers"),
    (lambda c: StaticCache(c, 1, 4.5), "batch_size and max_len must be positive integers, got 1, 4.5"),
    (lambda c: Int8Cache(c, True, 4), "batch_size and max_len must be positive integers, got True"),
    (lambda c: KVPool(c, 2, 16.0), "num_blocks and block_size must be positive integers"),
])
def test_cache_sizes_that_are_not_positive_integers(model, make, phrase):
    with pytest.raises(CacheError, match=phrase):
        make(model.config)


def test_truncate_refuses_fractional_lengths(model):
    cache = StaticCache(model.config, 1, 8)
    with pytest.raises(CacheError, match=r"one length >= 0 per sequence \(1, integers\), got \[2.5\]"):
        cache.truncate(torch.tensor([2.5]))


@pytest.mark.parametrize("cache, error, phrase", [
    (lambda c: StaticCache(c, 1, 6), GenerationError,
     "holds 6 tokens but this request needs 8.*max_len >= 8"),
    (lambda c: Int8Cache(c, 1, 6), GenerationError, "holds 6 tokens but this request needs 8"),
    (lambda c: StaticCache(c, 1, 16), GenerationError, "holds 1 sequences but 2 prompts.*batch_size >= 2"),
    (lambda c: object(), GenerationError, "cache must be 'static', 'dynamic', 'int8' or a cache object"),
    (lambda c: "paged", CacheError, "unknown cache 'paged'"),
])
def test_generate_refuses_a_cache_without_room_or_that_is_not_a_cache(model, cache, error, phrase):
    with pytest.raises(error, match=phrase):
        generate(model, [[1, 2, 3], [4, 5, 6]] if "sequences" in phrase else [[1, 2, 3]], 5,
                 cache=cache(model.config))


def test_the_dynamic_cache_refuses_to_grow_past_its_limit(model):
    cache = DynamicCache(model.config, 1, max_len=4)
    model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(CacheError, match="limit of 4"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


# ============================================================ quantization: calibration data
def _model_level(name):
    from llmopt_lab.transforms.quantize import awq, gptq, smoothquant

    return {"gptq": gptq.gptq_quantize_model, "awq": awq.awq_quantize_model,
            "smoothquant": smoothquant.smoothquant_model,
            "outliers": smoothquant.activation_outliers}[name]


@pytest.mark.parametrize("fn", ["gptq", "awq", "smoothquant", "outliers"])
@pytest.mark.parametrize("calibration, phrase", [
    ([], "calibration list is empty"),
    ([torch.zeros(2, 0, dtype=torch.long)], r"shape \(2, 0\) holds no tokens"),
    ([torch.zeros(2, 4)], r"must be \(B, T\) int64 tensors"),
    (None, "needs calibration data"),
])
def test_model_level_quantizers_check_their_calibration_data(model, fn, calibration, phrase):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizationError, match=phrase):
        _model_level(fn)(model, calibration)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before touching it


# ============================================================ kernels: ranges
def _paged_case():
    k = torch.randn(2, 1, 16, 32)
    return dict(q=torch.randn(2, 1, 32), k_cache=k, v_cache=k.clone(),
                block_tables=torch.tensor([[0], [1]]), context_lens=torch.tensor([3, 5]),
                query_start=torch.tensor([0, 1, 2]), max_queries=1)


@pytest.mark.parametrize("change, phrase", [
    (dict(context_lens=torch.tensor([3, -1])), "context_lens must be >= 0"),
    (dict(query_start=torch.tensor([0, 2, 1])), "query_start must rise from 0 to N = 2"),
    (dict(query_start=torch.tensor([0, 1, 3])), "query_start must rise from 0 to N = 2"),
    (dict(block_tables=torch.tensor([[0], [2]])), "outside the cache's 0..1"),
    (dict(block_tables=torch.tensor([[-1], [1]])), "outside the cache's 0..1"),
])
def test_paged_attention_refuses_ranges_that_would_read_out_of_bounds(change, phrase):
    from llmopt_lab.kernels.paged_attention import paged_attention

    case = _paged_case()
    case.update(change)
    with pytest.raises(ValueError, match=phrase):
        paged_attention(**case)


def test_flash_attention_still_takes_a_negative_q_start_tensor():
    """Positions before the first key are valid (they see nothing); only lengths must be >= 0."""
    from llmopt_lab.kernels.flash_attention import flash_attention

    q, k, v = (torch.randn(1, 2, 8, 32) for _ in range(3))
    out, lse = flash_attention(q, k, v, q_start=torch.tensor([-2]), k_len=torch.tensor([8]))
    assert out.shape == q.shape and bool(torch.isfinite(out).all())
    assert bool(torch.isinf(lse[..., :2]).all())  # rows at positions -2, -1 see no key


@pytest.mark.parametrize("call, phrase", [
    (lambda m: m.w8a8_matmul(torch.randn(1, 64), torch.zeros(64, 32, dtype=torch.int8), torch.ones(32)),
     r"w8a8 weight of shape \(64, 32\) with 32 scales: the weight looks transposed"),
    (lambda m: m.int4_matmul(torch.randn(1, 128), torch.zeros(32, 64, dtype=torch.uint8),
                             torch.ones(1, 32), torch.zeros(1, 32, dtype=torch.uint8), 128),
     r"packed int4 weight of shape \(32, 64\).*looks transposed.*\(64, 32\)"),
    (lambda m: m.int8_matmul(torch.randn(1, 64), torch.zeros(64, 32, dtype=torch.int8), torch.ones(16)),
     r"int8 scales must be float32 of shape \(32,\)"),  # not transposed: the scales are wrong
])
def test_a_transposed_quantized_weight_is_named_as_such(call, phrase):
    from llmopt_lab.kernels import quant_matmul

    with pytest.raises(ValueError, match=phrase):
        call(quant_matmul)


# ============================================================ the command line
@pytest.mark.parametrize("argv, phrase", [
    (["generate", "llmopt-tiny", "hi", "-n", "0"], "max_new_tokens must be a positive integer"),
    (["generate", "llmopt-tiny", "hi", "--device", "mps"], "'mps' is not supported"),
    (["generate", "llmopt-tiny", "hi", "--device", "cpu:1"], "single device 'cpu'"),
    (["generate", "llmopt-tiny", "hi", "--dtype", "int8"], "unknown dtype 'int8'"),
    (["generate", "llmopt-tiny", "hi", "--temperature", "-1"], "temperature must be a finite number"),
    (["generate", "llmopt-tiny", "hi", "--temperature", "1", "--top-p", "2"], "top_p must be"),
    (["generate", "llmopt-tiny", ""], "empty prompt"),
    (["generate", "llmopt-tiny", "hi", "-n", "5000"], "exceeds the model's context"),
    (["generate", "synthetic:tiny", "hi"], "has no tokenizer"),
    (["generate", "/nonexistent/llmopt-folder", "hi"], "does not exist"),
    (["bench", "99"], "no benchmark '99'"),
    (["bench", "02", "--size", "huge"], "unknown size 'huge'"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_the_command_line_prints_one_line_and_fails(capsys, argv, phrase):
    from llmopt_lab.cli import main

    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert phrase in err


def test_the_command_line_refuses_a_quantized_checkpoint(saved, tmp_path, capsys):
    from llmopt_lab.cli import main

    folder = _rewrite(saved, tmp_path, "model.layers.1.self_attn.k_proj.weight",
                      lambda w: (w * 50).round().to(torch.int8))
    assert main(["generate", str(folder), "hi", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "layers.1.self_attn.k_proj.weight" in err and "torch.int8" in err
