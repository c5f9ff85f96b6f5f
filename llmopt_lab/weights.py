"""Loading and saving models: local Hugging Face folders, hub ids, the built-in zoo.

``load_model(name_or_path)`` resolves, in this order:

1. a built-in zoo name (``"llmopt-tiny"``; see :data:`ZOO`), a folder shipped
   inside the package;
2. ``"synthetic:<preset>"``: random weights in the shape of a public model,
   created directly on the target device (for timing, never for quality);
3. an existing local folder with ``config.json`` and ``*.safetensors``;
4. otherwise a Hugging Face hub id, downloaded when the network allows.

Only safetensors are read (pickled ``.bin`` checkpoints can run code when
loaded) and no remote code is ever trusted. Every failure raises
:class:`~llmopt_lab.errors.ModelLoadError` (or a sibling) with a one-line
message naming the cause and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import ModelConfig, preset
from .errors import ConfigError, ModelLoadError, UnsupportedDtypeError
from .model import Transformer, check_dtype_for_device

ZOO_DIR = Path(__file__).parent / "zoo"

#: Built-in models: name -> folder inside the package (trained by ``train-zoo``).
ZOO: dict[str, Path] = {
    "llmopt-tiny": ZOO_DIR / "llmopt-tiny",
    "llmopt-tiny-draft": ZOO_DIR / "llmopt-tiny-draft",
}

SYNTHETIC_PREFIX = "synthetic:"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device=None) -> torch.device:
    """``None`` -> CUDA when available, else CPU. Raises for unknown devices."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' asked for but no CUDA GPU is available here; use 'cpu'")
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

    name_or_path: a zoo name, ``synthetic:<preset>``, a local checkpoint folder
    or a hub id. device: default CUDA if available, else CPU. dtype: default
    float32 on CPU, the checkpoint's dtype on GPU. The tokenizer is a
    transformers tokenizer, or None when the folder has none (synthetic models).
    The model is in eval mode.
    """
    name = str(name_or_path)
    dev = resolve_device(device)
    if name.startswith(SYNTHETIC_PREFIX):
        try:
            config = preset(name[len(SYNTHETIC_PREFIX):])
        except ConfigError as e:
            raise ModelLoadError(str(e)) from None
        dt = resolve_dtype(dtype, dev, config)
        return Transformer.from_config(config, device=dev, dtype=dt, attn_fn=attn_fn), None
    folder = _resolve_folder(name)
    config = ModelConfig.from_json_file(folder / "config.json", name=folder.name)
    dt = resolve_dtype(dtype, dev, config)
    model = _load_weights(folder, config, dev, dt, attn_fn)
    return model, load_tokenizer(folder)


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
        raise ModelLoadError(f"{path} is a file; give the checkpoint's folder (with config.json)")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise ModelLoadError(f"path {name!r} does not exist; give an existing checkpoint folder "
                             "(with config.json and *.safetensors)")
    if name.count("/") != 1 or not all(part.strip() for part in name.split("/")):
        raise ModelLoadError(
            f"{name!r} is not a zoo model ({', '.join(ZOO)}), an existing folder, "
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
                f"a zoo model ({', '.join(ZOO)})") from None
        raise ModelLoadError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({kind}): check the id and the "
            f"network, or give a local folder or a zoo model ({', '.join(ZOO)})") from None


def hf_to_local_key(key: str) -> str:
    """Hugging Face parameter name -> ours (drop the leading ``model.``)."""
    return key[len("model."):] if key.startswith("model.") else key


def local_to_hf_key(key: str) -> str:
    return key if key.startswith("lm_head.") else "model." + key


def _load_weights(folder: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype,
                  attn_fn) -> Transformer:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        if pickled:
            raise ModelLoadError(
                f"{folder} holds only pickled weights ({pickled[0]}); llmopt_lab reads safetensors "
                "only (pickle can run code): convert with transformers' save_pretrained("
                "safe_serialization=True)")
        raise ModelLoadError(f"{folder} has no *.safetensors weights")
    state = {}
    for f in files:
        for k, v in load_file(str(f), device="cpu").items():
            state[hf_to_local_key(k)] = v
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(config, attn_fn=attn_fn, dtype=dtype)
    expected = set(model.state_dict().keys())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ModelLoadError(
            f"{folder}: weights do not match the config (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})")
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_buffers()
    return model.eval()


def save_model(model: Transformer, folder: str | os.PathLike, tokenizer=None,
               dtype: torch.dtype | None = None) -> Path:
    """Write a Hugging Face checkpoint folder (config.json + model.safetensors
    [+ tokenizer]) that both :func:`load_model` and transformers read."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        if model.config.tie_word_embeddings and k == "lm_head.weight":
            continue
        state[local_to_hf_key(k)] = v.detach().to(dtype or v.dtype).contiguous().cpu()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    d = model.config.to_hf_dict()
    d["torch_dtype"] = str(dtype or model.dtype).replace("torch.", "")
    (folder / "config.json").write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def load_tokenizer(folder: Path):
    """transformers' tokenizer from a folder, or None when it has none."""
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model",
                                               "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


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
