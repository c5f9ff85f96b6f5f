"""Reading Llama-family GGUF files (llama.cpp's format) into our :class:`Transformer`.

A GGUF file holds, in one file, the model's hyperparameters and tokenizer as
key/value metadata (``llama.block_count``, ``tokenizer.ggml.tokens``,
``tokenizer.chat_template``, ...) and its tensors, each in its own storage type:
float (F32, F16, BF16) or block-quantized (Q8_0: groups of 32 with one scale;
Q4_0: 4-bit codes, groups of 32 with one scale; Q4_1: 4-bit codes, groups of
32 with a scale and a minimum; the k-quants ...). The parsing and the block
formats come from the ``gguf`` package (llama.cpp's own Python reader); what
this module adds is the translation to a Hugging Face-style Llama:

* the config: the ``llama.*`` keys become a config.json-style dict, read by
  :meth:`ModelConfig.from_hf_dict` like any other checkpoint;
* the tensor names: ``blk.3.attn_q.weight`` -> ``layers.3.self_attn.q_proj.weight``
  (:func:`gguf_to_local_name`; no ``output.weight`` means tied embeddings);
* the rows of q_proj and k_proj: llama.cpp rotates interleaved pairs
  (x0, x1), (x2, x3), ... while Hugging Face Llama (and
  :func:`llmopt_lab.model.apply_rope`) rotates the two halves of each head,
  so ``convert_hf_to_gguf.py`` reorders the rows of every head of q and k;
  :func:`unpermute_rope_rows` puts them back;
* every tensor is dequantized to float32 (:func:`dequantize_tensor`): the
  model is an ordinary float model, whatever the file's storage was.

The tokenizer (with its chat template) is built by transformers from the same
file's metadata (:func:`load_gguf_tokenizer`); nothing is downloaded.

Every failure raises :class:`~llmopt_lab.errors.ModelLoadError` with a one-line
message naming the file, the cause and the fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelConfig
from .errors import ConfigError, ModelLoadError

GGUF_MAGIC = b"GGUF"

#: storage types this reader is tested on (others the ``gguf`` package can
#: dequantize, e.g. the k-quants, are read as well).
TESTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

#: GGUF architectures read here (llama.cpp stores Llama, Mistral, SmolLM,
#: TinyLlama, ... under "llama", all with interleaved-RoPE rows in q and k).
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)

_LAYER_PARTS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True for an existing file whose name ends in ``.gguf`` or whose first
    four bytes are the GGUF magic. Never raises."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ModelLoadError("reading .gguf files needs the `gguf` package, which is not "
                             "installed; run `pip install gguf`") from None
    return gguf


def open_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` on ``path`` (memory-mapped: nothing is copied yet).

    Raises ModelLoadError for a missing file, a file that is not GGUF (wrong
    magic), one the reader cannot parse (truncated, damaged), or when the
    ``gguf`` package is not installed."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist; give the path of a .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path} ({type(e).__name__}); check its permissions") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with b'GGUF'); "
                             "give a .gguf file written by llama.cpp or the gguf package")
    gguf = _import_gguf()  # after the checks above: a file that is not GGUF is named as such anyway
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors ...
        first = (str(e).splitlines() or [""])[0][:160]
        raise ModelLoadError(f"{path} is a damaged or truncated GGUF file ({type(e).__name__}: "
                             f"{first}); download it again") from None


def _field_value(field) -> Any:
    """The Python value of one metadata field (str, int, float, bool or a list)."""
    gguf = _import_gguf()
    VT = gguf.GGUFValueType
    if not field.types:
        return None
    main = field.types[0]

    def one(part, typ):
        if typ == VT.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        v = part.tolist()[0] if hasattr(part, "tolist") else part
        return bool(v) if typ == VT.BOOL else v

    if main == VT.ARRAY:
        sub = field.types[-1]
        return [one(field.parts[i], sub) for i in field.data]
    return one(field.parts[field.data[0]], main)


def gguf_metadata(reader, skip_arrays_over: int = 1024) -> dict[str, Any]:
    """The file's key/value metadata as a dict. Arrays longer than
    ``skip_arrays_over`` (the tokenizer's tokens, scores and merges: tens of
    thousands of entries) are replaced by their length, as an int, under the
    key ``"<key>#len"``; everything else is a str, int, float, bool or list."""
    gguf = _import_gguf()
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and \
                len(field.data) > skip_arrays_over:
            out[key + "#len"] = len(field.data)
            continue
        out[key] = _field_value(field)
    return out


def _float32_decimal(x: float) -> float:
    """GGUF stores eps and theta as float32 (1e-5 reads back as
    9.99999974738e-06): the shortest decimal that float32 rounds to the same value."""
    return float(str(np.float32(x)))


def hf_config_dict(meta: dict[str, Any], tensor_names: set[str], path: str | Path = "") -> dict:
    """A Hugging Face config.json-style dict built from GGUF metadata.

    meta: :func:`gguf_metadata`'s dict; tensor_names: the file's tensor names
    (they decide tied embeddings and attention biases). Raises ModelLoadError
    for an architecture other than llama, missing keys, partial RoPE, or
    Llama-3.1-style RoPE frequency factors (``rope_freqs.weight``)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported; llmopt_lab "
                             f"reads Llama-family GGUF files (general.architecture "
                             f"{', '.join(map(repr, SUPPORTED_GGUF_ARCHITECTURES))})")
    p = arch + "."

    def need(key):
        if p + key not in meta:
            raise ModelLoadError(f"{path}: the GGUF metadata lacks {p + key!r}; the file is "
                                 "incomplete: convert the model again with llama.cpp")
        return meta[p + key]

    n_head = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(meta.get(p + "attention.key_length", hidden // max(n_head, 1)))
    if int(meta.get(p + "attention.value_length", head_dim)) != head_dim:
        raise ModelLoadError(f"{path}: keys and values of different widths are not supported")
    rope_dim = int(meta.get(p + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ModelLoadError(f"{path}: RoPE on {rope_dim} of {head_dim} head dimensions (partial "
                             "rotary) is not supported; use a model with full-width RoPE")
    if "rope_freqs.weight" in tensor_names:
        raise ModelLoadError(f"{path}: the file has per-frequency RoPE factors (rope_freqs.weight, "
                             "Llama-3.1-style scaling), which this reader does not map; load the "
                             "Hugging Face checkpoint instead")
    vocab = meta.get(p + "vocab_size") or meta.get("tokenizer.ggml.tokens#len") or \
        len(meta.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise ModelLoadError(f"{path}: the GGUF metadata gives no vocabulary size "
                             f"({p}vocab_size or tokenizer.ggml.tokens); convert the model again")
    scaling_type = meta.get(p + "rope.scaling.type")
    rope_scaling = None
    if scaling_type not in (None, "none", ""):
        rope_scaling = {"rope_type": scaling_type,
                        "factor": float(meta.get(p + "rope.scaling.factor", 1.0))}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get(p + "attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.get(p + "context_length", 2048)),
        "rms_norm_eps": _float32_decimal(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _float32_decimal(meta.get(p + "rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def read_gguf_config(reader, path: str | Path = "", name: str | None = None,
                     meta: dict[str, Any] | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of an open GGUF file (``name``: the config's
    name, default the file's stem; ``meta``: its :func:`gguf_metadata` when
    already read). Raises ModelLoadError for anything :func:`hf_config_dict`
    or :meth:`ModelConfig.from_hf_dict` refuses."""
    meta = gguf_metadata(reader) if meta is None else meta
    d = hf_config_dict(meta, {t.name for t in reader.tensors}, path)
    try:
        return ModelConfig.from_hf_dict(d, name=name or Path(path).stem or "gguf")
    except ConfigError as e:
        raise ModelLoadError(f"{path}: {e}") from None


def gguf_to_local_name(name: str) -> str | None:
    """GGUF tensor name -> ours (Hugging Face Llama names without ``model.``):
    ``blk.0.attn_q.weight`` -> ``layers.0.self_attn.q_proj.weight``,
    ``token_embd.weight`` -> ``embed_tokens.weight``, ``output_norm.weight`` ->
    ``norm.weight``, ``output.weight`` -> ``lm_head.weight``. None for a name
    with no counterpart."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_PARTS:
        return f"layers.{m.group(1)}.{_LAYER_PARTS[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of the rows of q_proj or k_proj.

    w: (n_heads * head_dim, ...) weight (or bias) as stored in the GGUF file.
    Within each head, the file's row 2i is Hugging Face's row i and the file's
    row 2i + 1 is Hugging Face's row i + head_dim / 2 (interleaved pairs ->
    halves). Returns a new tensor of the same shape in Hugging Face order.
    Raises ModelLoadError when the rows do not split into heads of even width.
    """
    rows = w.shape[0]
    if n_heads <= 0 or rows % (2 * n_heads):
        raise ModelLoadError(f"cannot split {rows} rows into {n_heads} heads of even width; the "
                             "file's head counts do not match its q/k tensors")
    half = rows // n_heads // 2
    rest = tuple(w.shape[1:])
    return w.reshape(n_heads, half, 2, *rest).transpose(1, 2).reshape(rows, *rest).contiguous()


def dequantize_tensor(tensor) -> torch.Tensor:
    """One ``gguf.ReaderTensor`` -> a float32 torch tensor in torch's shape order
    (GGUF lists dimensions fastest-first: ``[in, out]`` -> ``(out, in)``).

    Block formats are expanded with ``gguf.quants.dequantize`` (Q8_0:
    ``code * scale``; Q4_0: ``(code - 8) * scale``; Q4_1: ``code * scale + min``;
    one scale per 32 values of a row). The result owns its memory (it does not
    point into the memory-mapped file). Raises ModelLoadError for a storage
    type the gguf package cannot dequantize."""
    gguf = _import_gguf()
    kind = tensor.tensor_type
    try:
        arr = gguf.quants.dequantize(tensor.data, kind)
    except NotImplementedError:
        raise ModelLoadError(f"tensor {tensor.name!r} is stored as {kind.name}, which the "
                             "installed gguf package cannot dequantize; upgrade it with "
                             "`pip install -U gguf` or convert the model to Q8_0/Q4_K") from None
    shape = tuple(int(n) for n in reversed(list(tensor.shape)))
    arr = np.asarray(arr, dtype=np.float32)
    if arr.size != int(np.prod(shape)):
        raise ModelLoadError(f"tensor {tensor.name!r} holds {arr.size} values for the shape "
                             f"{shape}; the file is damaged: download it again")
    return torch.from_numpy(np.array(arr.reshape(shape), dtype=np.float32, copy=True))


def read_gguf_state(reader, config: ModelConfig, path: str | Path = "") -> dict[str, torch.Tensor]:
    """Every tensor of an open GGUF file as float32 under our names, q/k rows
    in Hugging Face order. ``lm_head.weight`` is absent for tied embeddings.

    Raises ModelLoadError for a tensor name with no counterpart in a Llama
    model, a tensor stored twice, a type that cannot be dequantized, or a
    missing tensor; shapes are checked by :func:`build_model`."""
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        local = gguf_to_local_name(t.name)
        if local is None:
            raise ModelLoadError(f"{path}: tensor {t.name!r} has no counterpart in a Llama model; "
                                 "this file is not a plain Llama (use its own runtime)")
        if local in state:
            raise ModelLoadError(f"{path}: tensor {t.name!r} is stored twice; the file is damaged")
        w = dequantize_tensor(t)
        if local.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rope_rows(w, config.num_heads)
        elif local.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rope_rows(w, config.num_kv_heads)
        state[local] = w
    return state


def build_model(state: dict[str, torch.Tensor], config: ModelConfig, device, dtype,
                attn_fn="sdpa", path: str | Path = ""):
    """A :class:`~llmopt_lab.model.Transformer` in eval mode holding ``state``
    (float tensors under our names), on ``device`` in ``dtype``.

    Raises ModelLoadError for missing or unexpected tensors, a shape other
    than the config's, or NaN/inf values."""
    from .weights import assign_weights, meta_model

    state = dict(state)
    model, expected = meta_model(config, dtype, attn_fn, state)
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise ModelLoadError(f"{path}: tensors do not match the file's metadata (missing "
                             f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); the "
                             "file is incomplete or not a plain Llama")
    for k in sorted(state):
        v = state[k]
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ModelLoadError(f"{path}: tensor {k!r} has shape {tuple(v.shape)} but the "
                                 f"metadata implies {tuple(expected[k].shape)}; the file is "
                                 "damaged or mislabelled")
        if not bool(torch.isfinite(v).all()):
            raise ModelLoadError(f"{path}: tensor {k!r} holds NaN or inf values; the file is "
                                 "damaged: download it again")
    return assign_weights(model, state, device, dtype)


def load_gguf_tokenizer(path: str | os.PathLike):
    """transformers' tokenizer built from the GGUF file's metadata (vocabulary,
    merges, special tokens, chat template), or None when the file has no
    tokenizer. Reads nothing but the file (no hub access, no remote code).
    Raises ModelLoadError when transformers cannot build it."""
    path = Path(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                             trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError, RuntimeError) as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise ModelLoadError(f"cannot build a tokenizer from {path} ({type(e).__name__}: "
                             f"{first}); the file's tokenizer type may be one transformers does "
                             "not convert") from None


def load_gguf(path: str | os.PathLike, device: torch.device, dtype: torch.dtype | None = None,
              attn_fn="sdpa", name: str | None = None, tokenizer: bool = True):
    """``(model, tokenizer)`` from a Llama-family GGUF file.

    The weights are dequantized to float32 and then cast to ``dtype`` (default
    float32 on CPU, as :func:`llmopt_lab.weights.resolve_dtype` decides) on
    ``device``: the model is an ordinary float :class:`Transformer` in eval
    mode (about 4 bytes per parameter in float32, whatever the file's
    storage). The tokenizer is None when the file has none (no
    ``tokenizer.ggml.model`` key) or with ``tokenizer=False``.
    Raises ModelLoadError (see :func:`open_gguf`, :func:`hf_config_dict`,
    :func:`read_gguf_state`, :func:`build_model`, :func:`load_gguf_tokenizer`)
    and UnsupportedDtypeError for a dtype the device cannot use.
    """
    from .weights import resolve_dtype

    path = Path(path)
    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    config = read_gguf_config(reader, path, name=name, meta=meta)
    dt = resolve_dtype(dtype, torch.device(device), config)
    state = read_gguf_state(reader, config, path)
    del reader
    model = build_model(state, config, torch.device(device), dt, attn_fn, path)
    has_tokenizer = tokenizer and bool(meta.get("tokenizer.ggml.model"))
    return model, (load_gguf_tokenizer(path) if has_tokenizer else None)


__all__ = ["is_gguf_file", "open_gguf", "gguf_metadata", "hf_config_dict", "read_gguf_config",
           "gguf_to_local_name", "unpermute_rope_rows", "dequantize_tensor", "read_gguf_state",
           "build_model", "load_gguf_tokenizer", "load_gguf", "TESTED_TYPES"]
