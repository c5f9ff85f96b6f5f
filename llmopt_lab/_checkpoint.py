"""Checked reading and atomic writing of Hugging Face checkpoint folders
(the helpers behind :mod:`llmopt_lab.weights`).

Reading: ``config.json`` must be a JSON object; the safetensors files are those
named by ``model.safetensors.index.json`` when there is one (other
``*.safetensors`` beside them are ignored), else every ``*.safetensors``; a
tensor present in two files, a corrupt file, a tensor whose shape differs from
the config's and a non-finite weight each raise one clear
:class:`~llmopt_lab.errors.ModelLoadError` naming the file or tensor.

Writing: only a model that can be saved faithfully (plain ``nn.Linear``
layers, float parameters) in a float dtype; the new files are written
completely in a temporary folder beside the target and then moved in, so a
failed save never leaves a half-written or mixed checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
import torch.nn as nn

from .config import ModelConfig
from .errors import ConfigError, ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

#: dtypes a checkpoint's tensors may have to be loaded (cast to the model's dtype).
LOADABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: dtypes a checkpoint can be saved in faithfully.
SAVE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------- reading
def read_json_object(path: Path, error=ConfigError) -> dict:
    """The JSON object in ``path``; ``error`` (a library error naming the file)
    if it cannot be read, is not JSON, or is not an object."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} is not a readable JSON file ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); restore it from the "
                    "checkpoint's source") from None
    if not isinstance(d, dict):
        raise error(f"{path} holds a JSON {type(d).__name__}, not an object "
                    "({\"key\": value, ...}); restore it from the checkpoint's source")
    return d


def read_config(folder: Path) -> ModelConfig:
    """The folder's ``config.json`` as a :class:`ModelConfig`. Raises ConfigError
    for a file that is not a JSON object, an unsupported model, or a quantized
    checkpoint (a ``quantization_config``: GPTQ, AWQ, bitsandbytes, fp8, ...),
    whose packed weights llmopt_lab does not read."""
    path = folder / CONFIG_FILE
    d = read_json_object(path)
    quant = d.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ConfigError(
            f"{path} describes a quantized checkpoint (quantization_config, quant_method="
            f"{method!r}); llmopt_lab loads float checkpoints only: load the unquantized model "
            "and quantize it with llmopt_lab.transforms.quantize")
    return ModelConfig.from_hf_dict(d, name=folder.name)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those the index names (when
    there is one), else every ``*.safetensors``. Raises ModelLoadError."""
    index = folder / INDEX_FILE
    if index.exists():
        d = read_json_object(index, ModelLoadError)
        weight_map = d.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(f"{index} has no valid \"weight_map\" (tensor name -> shard "
                                 "file); restore it or remove it to read every *.safetensors")
        files = []
        for name in sorted(set(weight_map.values())):
            f = folder / name
            if Path(name).name != name or not f.is_file():
                raise ModelLoadError(f"{index} names the shard {name!r}, which is not a file in "
                                     f"{folder}; download the missing shard")
            files.append(f)
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        if pickled:
            raise ModelLoadError(
                f"{folder} holds only pickled weights ({pickled[0]}); llmopt_lab reads safetensors "
                "only (pickle can run code): convert with transformers' save_pretrained("
                "safe_serialization=True)")
        raise ModelLoadError(f"{folder} has no *.safetensors weights")
    return files


def read_state(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of ``files`` (on the CPU) and the file each came from.
    Raises ModelLoadError for a corrupt file or a tensor in two files."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for f in files:
        try:
            tensors = load_file(str(f), device="cpu")
        except Exception as e:  # SafetensorError, OSError, ...: all mean a bad file
            first = (str(e).splitlines() or [""])[0][:200]
            raise ModelLoadError(f"{f} is not a readable safetensors file ({type(e).__name__}: "
                                 f"{first}); it may be truncated: download it again") from None
        for k, v in tensors.items():
            if k in origin:
                raise ModelLoadError(
                    f"the tensor {k!r} is in two shards, {origin[k].name} and {f.name} (in "
                    f"{f.parent}); remove the stale file or fix {INDEX_FILE}")
            state[k], origin[k] = v, f
    return state, origin


def check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                folder: Path, origin: dict[str, Path] | None = None, finite: bool = True) -> None:
    """Names, dtypes, shapes and (with ``finite``) finiteness of ``state``
    against ``expected`` (a meta model's state dict). Raises ModelLoadError
    naming the first bad tensor (and its file): a missing or unexpected name, a
    tensor that is not float (int8, uint8, bool, float8, ...: quantized weights
    are refused, not cast), a wrong shape, NaN or inf values."""
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise ModelLoadError(
            f"{folder}: weights do not match the config (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); use the config.json that came with them")
    origin = origin or {}
    for k in sorted(state):
        v, want = state[k], expected[k]
        where = f" (in {origin[k].name})" if k in origin else ""
        if v.dtype not in LOADABLE_DTYPES:
            raise ModelLoadError(
                f"{folder}: the tensor {k!r}{where} has dtype {v.dtype}; llmopt_lab loads "
                "float32/float16/bfloat16/float64 weights only (a quantized or damaged checkpoint "
                "cast to float would be silently wrong): load the float checkpoint and quantize "
                "it with llmopt_lab.transforms.quantize")
        if tuple(v.shape) != tuple(want.shape):
            raise ModelLoadError(
                f"{folder}: the tensor {k!r}{where} has shape {tuple(v.shape)} but config.json "
                f"implies {tuple(want.shape)}; use the config.json that came with these weights")
        if finite and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            kind = "NaN" if bool(torch.isnan(v).any()) else "inf"
            raise ModelLoadError(f"{folder}: the tensor {k!r}{where} holds non-finite values "
                                 f"({kind}); the checkpoint is damaged: download or re-save it")


# ----------------------------------------------------------------- writing
def save_dtype(dtype) -> torch.dtype | None:
    """None, or the float dtype to save in. Raises ModelLoadError otherwise."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in SAVE_DTYPES:
            raise ModelLoadError(f"cannot save in dtype {dtype!r}: use one of "
                                 f"{', '.join(SAVE_DTYPES)}")
        return SAVE_DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ModelLoadError(
            f"cannot save in dtype {dtype}: a checkpoint holds float32, float16 or bfloat16 "
            "weights (casting to an integer type would destroy them; quantize after loading)")
    return dtype


def check_saveable(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Raise ModelLoadError unless ``model`` is a plain :class:`Transformer`
    whose weights a Hugging Face checkpoint can hold exactly."""
    from .model import Transformer

    if not isinstance(model, Transformer):
        raise ModelLoadError(f"save_model needs an llmopt_lab Transformer, got "
                             f"{type(model).__name__}")
    from .transforms.fuse import is_fused

    if is_fused(model):
        raise ModelLoadError("cannot save a fused model (its q/k/v and gate/up projections are "
                             "concatenated): call llmopt_lab.transforms.fuse.unfuse(model) first, "
                             "then save")
    for attr, what, fix in (
            ("tensor_parallel", "a tensor-parallel shard (one rank's slice of every weight)",
             "save the whole model before apply_tensor_parallel"),
            ("pipeline", "a pipeline stage (a slice of the layers)",
             "save the whole model before make_stage"),
            ("offload_streamer", "an offloaded model (its layers are streamed from host memory)",
             "save the model before offload")):
        if getattr(model, attr, None) is not None:
            raise ModelLoadError(f"cannot save {what}: {fix}")
    from .transforms.lowrank import LoRALinear, LowRankLinear

    modules = list(model.named_modules())
    low = next(((n, m) for n, m in modules if isinstance(m, LowRankLinear)), None)
    if low is not None:  # checked first: merging adapters does not remove the factors
        raise ModelLoadError(
            f"cannot save: {low[0]} is a LowRankLinear (rank {low[1].rank}): a low-rank model "
            "(two thin factors in place of each weight) has no faithful Hugging Face "
            "checkpoint, whose format holds one dense weight per projection; keep it in "
            "memory (or torch.save its state_dict), or save the dense model and factorise "
            "again after loading")
    lora = next((n for n, m in modules if isinstance(m, LoRALinear)), None)
    if lora is not None:
        raise ModelLoadError(
            f"cannot save: {lora} is a LoRALinear (a LoRA adapter): a model with unmerged "
            "adapters has no faithful Hugging Face checkpoint; call "
            "llmopt_lab.transforms.lowrank.merge_lora(model) first, then save")
    with torch.device("meta"):
        ref = Transformer(model.config)
    mods = dict(model.named_modules())
    for name, mod in ref.named_modules():
        if type(mod) is nn.Linear and type(mods.get(name)) is not nn.Linear:
            raise ModelLoadError(
                f"cannot save: {name} is a {type(mods.get(name)).__name__}, not a plain "
                "nn.Linear (a quantized or transformed model has no faithful Hugging Face "
                "checkpoint); save the float model and quantize again after loading")
    for k, v in model.state_dict().items():
        if not v.is_floating_point():
            raise ModelLoadError(f"cannot save: the tensor {k!r} has dtype {v.dtype}, not a "
                                 "float dtype (float32/float16/bfloat16); save the float model "
                                 "and quantize again after loading")
        if dtype is None and v.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ModelLoadError(f"cannot save: the tensor {k!r} has dtype {v.dtype}; pass "
                                 "dtype=torch.float32 (or float16/bfloat16) to save_model")
    state = model.state_dict()
    for k, v in ref.state_dict().items():
        if k in state and tuple(state[k].shape) != tuple(v.shape):
            raise ModelLoadError(
                f"cannot save: the tensor {k!r} has shape {tuple(state[k].shape)} but the model's "
                f"config implies {tuple(v.shape)} (a pruned or reshaped model); its checkpoint "
                "would not load: update model.config to match first")
    expected = ref.state_dict().keys()
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ModelLoadError(f"cannot save: the model's tensors do not match its config (missing "
                             f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")


def has_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and ((folder / CONFIG_FILE).exists() or (folder / INDEX_FILE).exists()
                                or any(folder.glob("*.safetensors")))


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in ``parent`` with the usual permissions
    (``tempfile.mkdtemp`` would make it private, and it becomes the checkpoint)."""
    while True:
        path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # pragma: no cover
            continue


def write_atomically(folder: Path, write, overwrite: bool) -> Path:
    """Call ``write(tmp_folder)`` to write a whole checkpoint in a temporary
    folder beside ``folder``, then move it in (see :func:`save_model`)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ModelLoadError(f"{folder} is a file; give a folder to save the checkpoint in")
    if has_checkpoint(folder) and not overwrite:
        raise ModelLoadError(f"{folder} already holds a checkpoint; pass overwrite=True to "
                             "replace it, or save to another folder")
    parent = folder.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_dir(parent, f".{folder.resolve().name}.saving-")
    try:
        write(tmp)
        if not folder.exists():
            os.replace(tmp, folder)
            return folder
        # Move the old checkpoint's files aside first, so the folder never mixes
        # old shards with new ones; other files (README, logs) stay.
        old = _new_dir(parent, f".{folder.resolve().name}.old-")
        new_names = {p.name for p in tmp.iterdir()}
        moved_in: list[Path] = []
        try:
            for p in list(folder.iterdir()):
                if (p.name in new_names or p.name in (CONFIG_FILE, INDEX_FILE)
                        or p.suffix == ".safetensors"):
                    os.replace(p, old / p.name)
            for p in list(tmp.iterdir()):
                os.replace(p, folder / p.name)
                moved_in.append(folder / p.name)
        except BaseException:  # put the old checkpoint back as it was
            for p in moved_in:
                p.unlink(missing_ok=True)
            for p in list(old.iterdir()):
                os.replace(p, folder / p.name)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
