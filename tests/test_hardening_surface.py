"""Bad input at the rest of the public surface: the serving engine and its
SamplingParams, the parallel package, the GGUF loader, the low-rank, pruning,
depth and distillation transforms, and the command line. Each case asserts
the library's error class and a phrase of its message (what was wrong, and
usually the value)."""

import pytest
import torch

from llmopt_lab import Engine, SamplingParams, Transformer, generate, load_model, preset
from llmopt_lab.errors import (ConfigError, GenerationError, LlmoptError, ModelLoadError, ParallelError,
                               PruningError, ServingError, TrainingError, TransformError)


@pytest.fixture(scope="module")
def config():
    return preset("tiny")


@pytest.fixture(scope="module")
def model(config):
    return Transformer.from_config(config, seed=0)


def fresh(config):
    return Transformer.from_config(config, seed=0)


# ============================================================ the engine
@pytest.mark.parametrize("options, phrase", [
    (dict(policy="fifo"), "unknown batching policy 'fifo'"),
    (dict(max_num_seqs=0), "max_num_seqs must be a positive integer, got 0"),
    (dict(max_num_seqs="4"), "max_num_seqs must be a positive integer, got '4'"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens must be a positive integer"),
    (dict(policy="dynamic", max_wait_s=-1), "max_wait_s must be a number >= 0, got -1"),
    (dict(policy="dynamic", max_wait_s=float("nan")), "max_wait_s must be a number >= 0, got nan"),
    (dict(policy="static", chunked_prefill=True), "chunked prefill needs the continuous policy"),
    (dict(num_blocks=0), "num_blocks must be a positive integer, got 0"),
    (dict(num_blocks=4, kv_bytes=10 ** 6), "num_blocks or kv_bytes, not both"),
    (dict(kv_bytes=10), "kv_bytes must be an integer of at least one block"),
    (dict(block_size=0), "block_size must be an integer in 1..1024, got 0"),
    (dict(block_size=4096), "block_size must be an integer in 1..1024, got 4096"),
    (dict(kv_dtype="fp8"), "kv_dtype must be 'auto' or 'int8', got 'fp8'"),
])
def test_engine_options_out_of_range(model, options, phrase):
    with pytest.raises(ServingError, match=phrase):
        Engine(model, **options)


def test_engine_refuses_a_model_name_instead_of_a_model():
    with pytest.raises(ServingError, match="Engine takes a model .*got str"):
        Engine("llmopt-tiny")


@pytest.fixture
def engine(model):
    return Engine(model, num_blocks=8, block_size=16)


@pytest.mark.parametrize("prompts, phrase", [
    ([[]], "empty prompt"),
    ("hello", "a text prompt needs an engine with a tokenizer"),
    ([[1.5, 2]], "token ids must be integers"),
    ([[True, 2]], "token ids must be integers"),
    ([[1, 10 ** 6]], "token id 1000000, outside the vocabulary"),
    ([[1, -3]], "token id -3, outside the vocabulary"),
    ([], "no prompts given"),
    (5, "prompts must be a list of prompts .*got int"),
    (None, "prompts must be a list of prompts .*got NoneType"),
    ([torch.tensor([1.0, 2.0])], "token ids must be integers, got a torch.float32 tensor"),
    ([torch.zeros(2, 2, dtype=torch.long)[None]], "a prompt tensor must be 1-D"),
])
def test_engine_refuses_bad_prompts_before_queueing_anything(engine, prompts, phrase):
    with pytest.raises(ServingError, match=phrase):
        engine.generate(prompts, SamplingParams(max_new_tokens=2))
    assert not engine.has_unfinished()


@pytest.mark.parametrize("prompt, n, phrase", [
    ([1] * 100, 100, "a request of 200 tokens needs 13 KV blocks but the budget is 8"),
    ([1] * 1000, 100, r"= 1100 exceeds the model's context of 1024"),
])
def test_engine_refuses_a_request_larger_than_its_kv_budget_or_context(engine, prompt, n, phrase):
    with pytest.raises(ServingError, match=phrase):
        engine.generate([prompt], SamplingParams(max_new_tokens=n))
    engine.check_drained()


@pytest.mark.parametrize("params, phrase", [
    ({"max_new_tokens": 3}, "one SamplingParams for all prompts or one per prompt"),
    ([SamplingParams(), SamplingParams()], r"one per prompt \(1\), got 2"),
])
def test_engine_refuses_params_that_are_not_one_or_one_per_prompt(engine, params, phrase):
    with pytest.raises(ServingError, match=phrase):
        engine.generate([[1, 2]], params)


def test_engine_refuses_an_arrival_time_that_is_not_a_number(engine):
    with pytest.raises(ServingError, match="arrival_time must be a finite number.*'now'"):
        engine.add_request([1, 2], SamplingParams(max_new_tokens=2), arrival_time="now")
    assert not engine.has_unfinished()  # nothing queued: the next run is not broken by it
    assert engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))[0].finished


@pytest.mark.parametrize("call, phrase", [
    (lambda e: e.abort(99), "no request with id 99"),
    (lambda e: e.output(99), "no request with id 99"),
])
def test_engine_unknown_request_ids(engine, call, phrase):
    with pytest.raises(ServingError, match=phrase):
        call(engine)


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0.*nan"),
    (dict(temperature="0.7"), "temperature must be a finite number >= 0.*'0.7'"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(top_k=0), "top_k must be a positive integer or None, got 0"),
    (dict(top_k=2.5), "top_k must be a positive integer or None, got 2.5"),
    (dict(top_p=0), r"top_p must be a number in \(0, 1\], got 0"),
    (dict(top_p=float("nan")), r"top_p must be a number in \(0, 1\], got nan"),
    (dict(max_new_tokens=True), "max_new_tokens must be a positive integer, got True"),
    (dict(max_new_tokens="3"), "max_new_tokens must be a positive integer, got '3'"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=float("nan")), "seed must be an integer"),
    (dict(seed=2 ** 70), r"seed must be an integer in \[-2\*\*63, 2\*\*64\) or None, got 1180591620717411303424"),
    (dict(stop_token_ids="eos"), "stop_token_ids .* must be a token id >= 0 or a list of them, got 'eos'"),
    (dict(stop_token_ids=[-1]), r"must be a token id >= 0 or a list of them, got \[-1\]"),
])
def test_sampling_params_out_of_range(kwargs, phrase):
    with pytest.raises(GenerationError, match=phrase):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("seed", [2 ** 64, -2 ** 63 - 1])
def test_generate_refuses_a_seed_torch_cannot_take(model, seed):
    """Before: ValueError 'Overflow when unpacking long long' from torch.Generator."""
    with pytest.raises(GenerationError, match="seed must be an integer in"):
        generate(model, [[1, 2]], 2, temperature=1.0, seed=seed)


def test_the_largest_seed_still_works(model):
    out = generate(model, [[1, 2]], 2, temperature=1.0, seed=2 ** 64 - 1)
    assert out.num_tokens.tolist() == [2]


@pytest.mark.parametrize("ids, lengths, phrase", [
    (torch.ones(4, dtype=torch.long), torch.tensor([4]), r"prefill takes input_ids \(B, T\)"),
    (torch.ones(1, 4), torch.tensor([4]), "input_ids must hold integer token ids"),
    (torch.ones(1, 4, dtype=torch.long), torch.tensor([0]), r"lengths must lie in 1\.\.4.*\[0\]"),
    (torch.ones(1, 4, dtype=torch.long), torch.tensor([5]), r"lengths must lie in 1\.\.4.*\[5\]"),
    (torch.ones(2, 4, dtype=torch.long), torch.tensor([4]), r"lengths as a \(2,\) integer tensor"),
    (torch.ones(1, 4, dtype=torch.long), torch.tensor([2.0]), r"lengths as a \(1,\) integer tensor"),
])
def test_prefill_refuses_lengths_outside_the_prompt(model, ids, lengths, phrase):
    """A length of 0 used to read the logits of position -1 (the last padding token) silently."""
    from llmopt_lab import StaticCache, prefill

    with pytest.raises(GenerationError, match=phrase):
        prefill(model, ids, lengths, StaticCache(model.config, ids.shape[0] if ids.dim() == 2 else 1, 8))


@pytest.mark.parametrize("tokens, positions", [
    (torch.tensor([[1]]), torch.tensor([[0]])),
    (torch.tensor([1, 2]), torch.tensor([0])),
])
def test_decode_one_token_checks_shapes(model, tokens, positions):
    from llmopt_lab import StaticCache, decode_one_token

    with pytest.raises(GenerationError, match=r"decode_one_token takes tokens \(B,\) and positions \(B,\)"):
        decode_one_token(model, tokens, positions, StaticCache(model.config, 2, 8))


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(config="tiny"), r"from_config takes a ModelConfig, got str \(use preset\('tiny'\)\)"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(dtype="float16"), "dtype must be a floating torch.dtype.*'float16'"),
    (dict(dtype=torch.int8), "dtype must be a floating torch.dtype"),
    (dict(seed="x"), "seed must be an integer, got 'x'"),
])
def test_from_config_bad_arguments(config, kwargs, phrase):
    """Before: AttributeError, RuntimeError, TypeError from torch."""
    kw = dict(config=config)
    kw.update(kwargs)
    with pytest.raises(ConfigError, match=phrase):
        Transformer.from_config(**kw)


def test_an_unknown_attention_is_a_config_error(config):
    with pytest.raises(ConfigError, match="unknown attention 'flashy'; known: sdpa"):
        load_model("synthetic:tiny", device="cpu", attn_fn="flashy")


# ============================================================ the parallel package
from llmopt_lab import parallel as P  # noqa: E402


@pytest.mark.parametrize("call, phrase", [
    (lambda: P.column_split(torch.randn(8, 4), 0, 0), r"world size\) must be a positive integer, got 0"),
    (lambda: P.column_split(torch.randn(8, 4), 5, 2), r"rank must be an integer in 0\.\.1 .*got 5"),
    (lambda: P.column_split(torch.randn(8, 4), -1, 2), r"rank must be an integer in 0\.\.1 .*got -1"),
    (lambda: P.row_split(torch.randn(8, 4), 0, "2"), "must be a positive integer, got '2'"),
    (lambda: P.row_split(torch.randn(8, 4), 3, 2), "got 3"),
    (lambda: P.column_split(torch.randn(6, 4), 0, 4), "cannot split 6 output features over 4 ranks"),
    (lambda: P.row_split(torch.randn(4, 6), 0, 4), "cannot split 6 input features over 4 ranks"),
    (lambda: P.kv_heads_for_rank(4, 2, 0, 0), "must be a positive integer, got 0"),
    (lambda: P.kv_heads_for_rank(4, 2, 7, 2), r"rank must be an integer in 0\.\.1 .*got 7"),
    (lambda: P.kv_heads_for_rank(4, 2, 0, 3), "4 query heads cannot be split over 3 ranks"),
    (lambda: P.kv_heads_for_rank(6, 3, 0, 2), "3 KV heads cannot be split or replicated over 2 ranks"),
    (lambda: P.bubble_fraction(0, 1), "stages and micro-batches must be integers >= 1, got 0, 1"),
    (lambda: P.bubble_fraction("2", 1), "must be integers >= 1, got '2', 1"),
    (lambda: P.partition_layers(4, "2"), "num_layers and stages must be integers, got 4, '2'"),
    (lambda: P.partition_layers(2, 3), "cannot cut 2 layers into 3 pipeline stages"),
    (lambda: P.shard_requests(4, 2, 2), r"rank 2 is not in 0\.\.1"),
    (lambda: P.decode_comm_bytes(preset("tiny"), 1, 0), "must be a positive integer, got 0"),
    (lambda: P.decode_comm_bytes(preset("tiny"), -1, 2), "batch must be an integer >= 0.*got -1"),
    (lambda: P.launch("xx"), "unknown parallel mode 'xx'"),
    (lambda: P.launch("tp", nprocs=True), "nprocs must be a positive integer, got True"),
    (lambda: P.launch("tp", nprocs=1, timeout=-1), "timeout must be a positive number of seconds, got -1"),
    (lambda: P.Comm(), "torch.distributed is not initialized"),
])
def test_parallel_arguments_out_of_range(call, phrase):
    with pytest.raises(ParallelError, match=phrase):
        call()


def _comm(world, rank=0):
    c = P.Comm.single()
    c.world_size, c.rank = world, rank
    return c


@pytest.mark.parametrize("comm, phrase", [
    (lambda: _comm(3), "vocabulary of 512 cannot be split over 3 ranks"),
    (lambda: _comm(8), "4 query heads cannot be split over 8 ranks: choose a degree that divides 4"),
    (lambda: _comm(0), r"world size\) must be a positive integer, got 0"),
    (lambda: _comm(2, 5), r"comm.rank must be an integer in 0\.\.1 .*got 5"),
    (lambda: None, "apply_tensor_parallel needs a Comm .*got NoneType"),
])
def test_tensor_parallel_refuses_a_degree_or_rank_that_does_not_fit(config, comm, phrase):
    m = fresh(config)
    with pytest.raises(ParallelError, match=phrase):
        P.apply_tensor_parallel(m, comm())
    assert not P.is_tensor_parallel(m)


@pytest.mark.parametrize("make, phrase", [
    (lambda m: P.apply_tensor_parallel(torch.nn.Linear(2, 2), P.Comm.single()),
     "takes an llmopt_lab Transformer, got Linear"),
    (lambda m: P.apply_tensor_parallel(P.apply_tensor_parallel(m, P.Comm.single()), P.Comm.single()),
     "already tensor parallel"),
    (lambda m: P.make_stage(m, 3, 2), r"stage 3 is not in 0\.\.1"),
    (lambda m: P.make_stage(m, 0, 2, layers=(2, 1)), "layer range 2:1 is not a non-empty part"),
    (lambda m: P.make_stage(P.make_stage(m, 0, 2), 0, 2), "already a pipeline stage"),
    (lambda m: P.offload(torch.nn.Linear(2, 2)), "offload takes an llmopt_lab Transformer.*got Linear"),
    (lambda m: P.offload(m, device="tpu"), "unknown device 'tpu'"),
])
def test_parallel_transforms_refuse_what_they_cannot_cut(config, make, phrase):
    with pytest.raises(ParallelError, match=phrase):
        make(fresh(config))


@pytest.mark.parametrize("prompts, kwargs, error, phrase", [
    (["hi"], {}, GenerationError, r"prompt 0 is text \('hi'\): tokenize it first"),
    ([[1.5, 2]], {}, GenerationError, "prompt 0 must be a list of integer token ids"),
    ([[1, 10 ** 6]], {}, GenerationError, "token id 1000000, outside the vocabulary"),
    ([], {}, ParallelError, "needs at least one prompt"),
    ([[1, 2]], dict(micro_batches=3), ParallelError, "micro_batches must be between 1 and the 1 prompts"),
    ([[1, 2]], dict(max_new_tokens=True), ParallelError, "max_new_tokens must be a positive integer"),
])
def test_pipeline_generate_refuses_bad_prompts(config, prompts, kwargs, error, phrase):
    stage = P.make_stage(fresh(config), 0, 1)
    n = kwargs.pop("max_new_tokens", 2)
    with pytest.raises(error, match=phrase):
        P.pipeline_generate(stage, P.Comm.single(), prompts, n, **kwargs)


# ============================================================ GGUF files
@pytest.mark.parametrize("content, phrase", [
    (b"PK\x03\x04" + bytes(60), "is not a GGUF file"),
    (b"", "is not a GGUF file"),
    (b'{"not": "gguf"}', "is not a GGUF file"),
], ids=["zip", "empty", "json"])
@pytest.mark.parametrize("have_gguf", [True, False])
def test_a_file_that_is_not_gguf_is_named_as_such(tmp_path, monkeypatch, content, phrase, have_gguf):
    """Without the gguf package, before: 'reading .gguf files needs the gguf
    package' where the file was no GGUF file at all."""
    if not have_gguf:
        monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # import gguf -> ImportError
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=phrase) as e:
        load_model(str(path), device="cpu")
    assert "model.gguf" in str(e.value)


def test_a_gguf_file_without_the_gguf_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(32))
    with pytest.raises(ModelLoadError, match="needs the `gguf` package.*pip install gguf"):
        load_model(str(path), device="cpu")


def test_a_missing_gguf_file(tmp_path):
    from llmopt_lab.weights_gguf import open_gguf

    with pytest.raises(ModelLoadError, match="does not exist"):
        open_gguf(tmp_path / "absent.gguf")


def test_a_truncated_gguf_file(tmp_path):
    pytest.importorskip("gguf", reason="the gguf package is not installed")
    from llmopt_lab.weights_gguf import open_gguf

    path = tmp_path / "cut.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00\x05")
    with pytest.raises(ModelLoadError, match="damaged or truncated"):
        open_gguf(path)


# ============================================================ low rank, pruning, depth
from llmopt_lab.transforms import depth, lowrank as LR, prune as PR  # noqa: E402


@pytest.mark.parametrize("call, phrase", [
    (lambda m: LR.svd_factors(torch.randn(16, 8), 0), r"rank must be an integer in \[1, min\(out, in\)\] = \[1, 8\]"),
    (lambda m: LR.svd_factors(torch.randn(8), 2), "a weight must be a 2-D float tensor"),
    (lambda m: LR.rank_for_energy(torch.ones(4), 1.5), r"energy is the fraction of sum\(S\^2\) kept, in \(0, 1\]; got 1.5"),
    (lambda m: LR.rank_for_params(8, 8, 0), "param_fraction is the fraction .* got 0"),
    (lambda m: LR.whitening_factor(torch.randn(4, 3)), "input_gram must be a square"),
    (lambda m: LR.LoRALinear(torch.nn.Conv1d(4, 4, 1), r=2), "LoRALinear wraps an nn.Linear, got Conv1d"),
    (lambda m: LR.lowrank(m), "give exactly one of rank=, energy=, param_fraction="),
    (lambda m: LR.lowrank(m, rank=2, energy=0.5), r"\(got rank, energy\)"),
    (lambda m: LR.lowrank(m, rank=True), "rank must be a positive integer, got True"),
    (lambda m: LR.lowrank(m, energy=float("nan")), "got nan"),
    (lambda m: LR.lowrank(m, rank=2, method="pca"), "unknown low-rank method 'pca'"),
    (lambda m: LR.lowrank(m, rank=2, method="asvd"), "method 'asvd' needs calibration data"),
    (lambda m: LR.lowrank(m, rank=2, method="asvd", calibration=[torch.zeros(1, 0, dtype=torch.long)]),
     r"shape \(1, 0\) holds no tokens"),
    (lambda m: LR.lowrank(m, rank=2, include="(["), "include: unterminated character set"),
    (lambda m: LR.lowrank(m, rank=2, include="nothing"), "include='nothing' matches no decoder layer"),
    (lambda m: LR.lowrank(torch.nn.Linear(2, 2), rank=2), "Linear has no decoder blocks"),
    (lambda m: LR.add_lora(m, r=0), "the LoRA rank r must be a positive integer, got 0"),
])
def test_lowrank_bad_input(config, call, phrase):
    with pytest.raises(TransformError, match=phrase):
        call(fresh(config))


CALIB = [torch.randint(0, 512, (1, 8))]


@pytest.mark.parametrize("call, phrase", [
    (lambda m: PR.prune(m, "random"), "unknown pruning method 'random'"),
    (lambda m: PR.prune(m, sparsity=1.0), r"in \[0, 1\); got 1.0"),
    (lambda m: PR.prune(m, sparsity="0.5"), r"in \[0, 1\); got '0.5'"),
    (lambda m: PR.prune(m, pattern="3:2"), "pattern must be 'N:M' with 0 < N < M"),
    (lambda m: PR.prune(m, pattern="2:7"), "128 inputs, not a multiple of 7"),
    (lambda m: PR.prune(m, "wanda"), "method 'wanda' needs calibration data"),
    (lambda m: PR.prune(m, "wanda", calibration=[torch.full((1, 4), 10 ** 6)]),
     r"calibration tokens outside the vocabulary \[0, 512\)"),
    (lambda m: PR.prune(m, "sparsegpt", calibration=CALIB, block_size=0),
     "block_size must be a positive integer .*got 0"),
    (lambda m: PR.sparsegpt_prune_layer(torch.randn(4, 8), torch.eye(8), block_size=0),
     "block_size must be a positive integer"),
    (lambda m: PR.is_n_m_sparse(torch.randn(4, 8), 2, 0), "n=2, m=0"),
    (lambda m: PR.is_n_m_sparse(torch.randn(4, 8), 5, 4), "n=5, m=4"),
    (lambda m: PR.prune(m, scope="model"), "scope must be 'layer' or 'global', got 'model'"),
])
def test_pruning_bad_input(config, call, phrase):
    m = fresh(config)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(PruningError, match=phrase):
        call(m)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # untouched


@pytest.mark.parametrize("call, phrase", [
    (lambda m: depth.remove_layers(m, [0, 1, 2, 3]), "removing 4 of 4 layers leaves none"),
    (lambda m: depth.remove_layers(m, [9]), r"layer indices \[9\] are outside 0\.\.3"),
    (lambda m: depth.remove_layers(m, ["1"]), "layer indices must be integers"),
    (lambda m: depth.share_layers(m, [(1, 1)]), "layer 1 cannot share weights with itself"),
    (lambda m: depth.block_influence(m, []), "needs at least one calibration batch"),
    (lambda m: depth.block_influence(m, [torch.zeros(1, 0, dtype=torch.long)]),
     r"shape \(1, 0\) holds no tokens"),
    (lambda m: depth.block_influence(m, [torch.full((1, 4), 10 ** 6)]), "outside the vocabulary"),
    (lambda m: depth.block_influence(m, [torch.zeros(1, 4)]), r"must be \(B, T\) int64 tensors"),
])
def test_depth_bad_input(config, call, phrase):
    """block_influence before: RuntimeError (no tokens), IndexError (ids outside the vocabulary)."""
    with pytest.raises(TransformError, match=phrase):
        call(fresh(config))


# ============================================================ distillation
from llmopt_lab import distill as D  # noqa: E402

S, T = torch.randn(2, 5, 16), torch.randn(2, 5, 16)


@pytest.mark.parametrize("call, phrase", [
    (lambda: D.kd_loss(S, T, temperature=0), "temperature must be a positive number, got 0"),
    (lambda: D.kd_loss(S, T, alpha=2), r"alpha must be in \[0, 1\], got 2"),
    (lambda: D.kd_loss(S, torch.randn(2, 5, 17)), "differ .*needs the same vocabulary"),
    (lambda: D.kd_loss(S, T, kind="sideways"), "kind must be one of"),
    (lambda: D.kd_loss(S, T, alpha=0.5), "pass labels"),
    (lambda: D.kd_loss(S, T, torch.full((2, 5), 99), alpha=0.5), r"token id 99, outside the vocabulary of the logits \(0\.\.15"),
    (lambda: D.kd_loss(S, T, torch.full((2, 5), -5), alpha=0.5), "token id -5, outside the vocabulary"),
    (lambda: D.kd_loss(S, T, torch.zeros(2, 5), alpha=0.5), "labels must be integer token ids"),
    (lambda: D.sequence_batches([[1, 2, 3, 4, 5, 6]], 0, 4), "batch_size must be a positive integer, got 0"),
    (lambda: D.sequence_batches([[1, 2]], 1, 4), "fewer than one window of seq_len=4"),
])
def test_distillation_losses_and_data_bad_input(call, phrase):
    """kd_loss before: IndexError 'Target 99 is out of bounds' for labels outside the vocabulary."""
    with pytest.raises(TrainingError, match=phrase):
        call()


def test_kd_loss_still_ignores_the_ignore_index():
    labels = torch.tensor([[1, 2, -100, 3, 4], [0, -100, -100, 5, 6]])
    assert torch.isfinite(D.kd_loss(S, T, labels, alpha=0.5))


@pytest.mark.parametrize("prompts, error, phrase", [
    (["hi"], TrainingError, r"prompt 0 is text \('hi'\)"),
    ([[1, 2.5]], TrainingError, "prompt 0 must be a list of integer token ids"),
    ([[10 ** 6]], GenerationError, "token id 1000000, outside the vocabulary"),
])
def test_teacher_sequences_refuses_prompts_that_are_not_token_ids(config, prompts, error, phrase):
    with pytest.raises(error, match=phrase):
        D.teacher_sequences(fresh(config), prompts, 2)


def test_distill_refuses_a_batch_outside_the_vocabulary_before_training(config):
    from llmopt_lab.training import TrainSettings

    student, teacher = fresh(config), fresh(config)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(TrainingError, match="distillation batch holds token id 1000000"):
        D.distill(student, teacher, [torch.full((1, 5), 10 ** 6)], TrainSettings(steps=1))
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


# ============================================================ the command line
@pytest.mark.parametrize("argv, code, phrase", [
    (["generate", "llmopt-tiny", "hi", "--temperature", "abc"], 2, "invalid float value: 'abc'"),
    (["generate", "llmopt-tiny"], 2, "the following arguments are required: prompt"),
    (["zoo", "frob"], 2, "invalid choice: 'frob'"),
    (["parallel", "tq"], 2, "invalid choice: 'tq'"),
    (["generate", "llmopt-tiny", "hi", "--seed", str(2 ** 70)], 1, "seed must be an integer in"),
    (["generate", "llmopt-tiny", "hi", "--temperature", "nan"], 1, "temperature must be a finite number"),
    (["generate", "llmopt-tiny", "hi", "--top-k", "0"], 1, "top_k must be a positive integer"),
    (["generate", "llmopt-tiny", "hi", "--device", "cuda:x"], 1, "unknown device 'cuda:x'"),
    (["chat", "synthetic:tiny", "--prompt", "hi"], 1, "has no chat template"),
    (["zoo", "fetch", "no-such-model"], 1, "'no-such-model' is not a fetched zoo model"),
    (["bench", "02", "--device", "tpu"], 1, "unknown device 'tpu'"),
    (["bench", "02", "--show", "/nonexistent/result.json"], 1, "cannot read a stored result"),
    (["tour", "--size", "huge"], 1, "--size 'huge' applies to the benchmarks of `tour --full`"),
    (["tour", "--device", "tpu"], 1, "unknown device 'tpu'"),
    (["parallel", "tp", "--kwargs", "notjson"], 1, "--kwargs must be a JSON object"),
    (["parallel", "tp", "--kwargs", "[1, 2]"], 1, r"--kwargs must be a JSON object \(a dict\)"),
    (["parallel", "tp", "-n", "0"], 1, "--max-new-tokens must be >= 1, got 0"),
    (["parallel", "pp", "--micro-batches", "0"], 1, r"--micro-batches must be >= 1, got \[0\]"),
    (["parallel", "tp"], 1, "no process group to join"),
    (["exercises", "build", "--root", "/nonexistent"], 1, "no solutions/ folder under /nonexistent"),
    (["info", "--device", "cuda:x"], 1, "unknown device 'cuda:x'"),
])
def test_the_command_line_refuses_bad_arguments_in_one_line(capsys, argv, code, phrase):
    """Before: argparse's usage block and SystemExit(2) escaping main(); a
    JSONDecodeError traceback for --kwargs; `tour --size huge` ran the whole
    tour, ignoring the size."""
    import re

    from llmopt_lab.cli import main

    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert re.search(phrase, err), err


def test_help_still_exits_zero(capsys):
    from llmopt_lab.cli import main

    assert main(["generate", "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_every_error_class_is_a_library_error():
    for cls in (ConfigError, GenerationError, ModelLoadError, ParallelError, PruningError, ServingError,
                TrainingError, TransformError):
        assert issubclass(cls, LlmoptError)
