"""Hardening of checkpoint loading and saving (llmopt_lab.weights): faithful,
atomic saves; no remote code; no pickles; shards, shapes and non-finite
weights checked; clear errors for bad names and corrupt files."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmopt_lab import Transformer, load_model, preset, save_model
from llmopt_lab.errors import ConfigError, LlmoptError, ModelLoadError, TrainingError
from llmopt_lab.weights import ZOO, load_tokenizer


def _tiny(seed=1):
    return Transformer.from_config(preset("tiny"), seed=seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hard") / "ckpt"
    save_model(_tiny(), folder)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ============================================================ 1. save_model
def test_save_refuses_a_quantized_model_and_keeps_the_checkpoint(tmp_path):
    from llmopt_lab.transforms import quantize as Q

    folder = tmp_path / "ckpt"
    save_model(_tiny(), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    model, _ = load_model(folder, device="cpu")
    q = Q.quantize(model, "int8")
    with pytest.raises(ModelLoadError, match="quantized|not a plain") as e:
        save_model(q, folder, overwrite=True)
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    load_model(folder, device="cpu")  # still loads


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float64, "int8"])
def test_save_refuses_non_float_dtypes(tmp_path, dtype):
    with pytest.raises(LlmoptError, match="dtype"):
        save_model(_tiny(), tmp_path / "x", dtype=dtype)
    assert not (tmp_path / "x").exists()


def test_save_refuses_non_float_parameters(tmp_path):
    model = _tiny()
    model.norm.weight = torch.nn.Parameter(torch.ones(model.config.hidden_size, dtype=torch.int32),
                                           requires_grad=False)
    with pytest.raises(ModelLoadError, match="norm.weight.*int32"):
        save_model(model, tmp_path / "x")


def test_save_refuses_a_pruned_model_whose_shapes_differ_from_its_config(tmp_path):
    model = _tiny()
    mlp = model.layers[0].mlp
    mlp.up_proj = torch.nn.Linear(mlp.up_proj.in_features, 8, bias=False)
    with pytest.raises(ModelLoadError, match=r"layers\.0\.mlp\.up_proj\.weight.*\(8, "):
        save_model(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_saved_folder_is_not_private(tmp_path):
    import os
    import stat

    save_model(_tiny(), tmp_path / "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o777 & ~umask


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "bfloat16"])
def test_save_float_dtypes_roundtrip(tmp_path, dtype):
    save_model(_tiny(), tmp_path / "x", dtype=dtype)
    model, _ = load_model(tmp_path / "x", device="cpu")
    ref = _tiny()
    torch.testing.assert_close(model.layers[0].mlp.up_proj.weight,
                               ref.layers[0].mlp.up_proj.weight, atol=1e-2, rtol=1e-2)


def test_save_refuses_to_overwrite_a_checkpoint_unless_asked(tmp_path):
    folder = tmp_path / "ckpt"
    save_model(_tiny(seed=1), folder)
    with pytest.raises(ModelLoadError, match="overwrite=True"):
        save_model(_tiny(seed=2), folder)
    # an older sharded checkpoint: its shards and index must not survive next to the new file
    save_file({"junk": torch.zeros(2)}, str(folder / "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors.index.json").write_text("{}")
    (folder / "README.md").write_text("card")
    save_model(_tiny(seed=2), folder, overwrite=True)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"]
    model, _ = load_model(folder, device="cpu")
    torch.testing.assert_close(model.norm.weight, _tiny(seed=2).norm.weight)
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"], "temporary files left"


def test_save_into_a_folder_without_a_checkpoint_keeps_other_files(tmp_path):
    (tmp_path / "README.md").write_text("card")
    save_model(_tiny(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json",
                                                          "model.safetensors"]


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    save_model(_tiny(seed=1), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_model(_tiny(seed=2), folder, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_failed_swap_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    import os

    from llmopt_lab import _checkpoint

    folder = tmp_path / "ckpt"
    save_model(_tiny(seed=1), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real = os.replace

    def flaky(src, dst):
        if ".saving-" in str(src) and Path(src).name == "config.json":
            raise OSError("interrupted")
        return real(src, dst)

    monkeypatch.setattr(_checkpoint.os, "replace", flaky)
    with pytest.raises(OSError, match="interrupted"):
        save_model(_tiny(seed=2), folder, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ============================================================ 2. no remote code
def _remote_code_checkpoint(tmp_path):
    folder = _copy(ZOO["llmopt-tiny"], tmp_path / "remote")
    marker = tmp_path / "imported.marker"
    (folder / "x.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class Tok(PreTrainedTokenizerFast):\n    pass\n")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["x.Tok", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder, marker


def test_tokenizer_with_auto_map_is_refused(tmp_path):
    folder, marker = _remote_code_checkpoint(tmp_path)
    with pytest.raises(ModelLoadError, match="auto_map") as e:
        load_model(folder, device="cpu")
    assert str(folder) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="remote code"):
        load_tokenizer(folder)
    assert not marker.exists()
    assert not any(name == "x" or name.endswith(".x") for name in sys.modules)


def test_config_auto_map_for_the_tokenizer_is_refused(tmp_path):
    folder = _copy(ZOO["llmopt-tiny"], tmp_path / "remote")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["x.Tok", None]}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="auto_map"):
        load_tokenizer(folder)


def test_no_trust_remote_code_true_in_the_package():
    import llmopt_lab

    root = Path(llmopt_lab.__file__).parent
    for f in root.rglob("*.py"):
        text = f.read_text(encoding="utf-8").replace(" ", "")
        assert "trust_remote_code=True" not in text, f


# ============================================================ 3. no pickles on resume
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_resume_refuses_a_crafted_pickle(tmp_path):
    from llmopt_lab.training import TrainSettings, train

    marker = tmp_path / "pwned.marker"
    ckpt = tmp_path / "run.ckpt"
    torch.save({"model": _Evil(str(marker)), "optimizer": {}, "log": {}, "step": 0}, ckpt)
    assert not marker.exists()
    cfg = preset("tiny").replace(vocab_size=64, num_layers=1)
    model = Transformer.from_config(cfg)
    batch = torch.zeros(2, 9, dtype=torch.long)
    with pytest.raises(TrainingError, match="cannot read the checkpoint"):
        train(model, lambda i: batch, TrainSettings(steps=2, batch_size=2, seq_len=8),
              checkpoint=ckpt, resume=True, progress=False)
    assert not marker.exists()


def test_every_torch_load_uses_weights_only():
    import ast

    import llmopt_lab

    root = Path(llmopt_lab.__file__).parent
    calls = 0
    for f in root.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant), (f, node.lineno)
                assert kw["weights_only"].value is True, (f, node.lineno)
    assert calls >= 1


# ============================================================ 4. shards, shapes, values
def _shard(saved: Path, folder: Path, index: bool = True) -> tuple[Path, dict]:
    """Split the saved checkpoint into two shards (+ index)."""
    folder.mkdir()
    (folder / "config.json").write_text((saved / "config.json").read_text())
    state = load_file(str(saved / "model.safetensors"))
    keys = sorted(state)
    half = len(keys) // 2
    parts = {"model-00001-of-00002.safetensors": keys[:half],
             "model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for name, ks in parts.items():
        save_file({k: state[k] for k in ks}, str(folder / name))
        weight_map.update({k: name for k in ks})
    if index:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, state


def test_sharded_checkpoint_with_index_loads(tmp_path, saved):
    folder, _ = _shard(saved, tmp_path / "s")
    model, _ = load_model(folder, device="cpu")
    torch.testing.assert_close(model.norm.weight, _tiny().norm.weight)


def test_extra_safetensors_beside_indexed_shards_are_ignored(tmp_path, saved):
    folder, state = _shard(saved, tmp_path / "s")
    key = "model.norm.weight"
    save_file({key: torch.full_like(state[key], 7.0), "adapter.x": torch.zeros(3)},
              str(folder / "adapter_model.safetensors"))
    model, _ = load_model(folder, device="cpu")
    torch.testing.assert_close(model.norm.weight, _tiny().norm.weight)


def test_a_key_in_two_shards_is_refused(tmp_path, saved):
    folder, state = _shard(saved, tmp_path / "s", index=False)
    first = load_file(str(folder / "model-00001-of-00002.safetensors"))
    key = sorted(first)[0]
    second = load_file(str(folder / "model-00002-of-00002.safetensors"))
    second[key] = torch.zeros_like(first[key])
    save_file(second, str(folder / "model-00002-of-00002.safetensors"))
    with pytest.raises(ModelLoadError, match=rf"{key}.*model-00001-of-00002.safetensors.*"
                                             r"model-00002-of-00002.safetensors"):
        load_model(folder, device="cpu")


def test_a_key_in_two_indexed_shards_is_refused(tmp_path, saved):
    folder, state = _shard(saved, tmp_path / "s")
    first = load_file(str(folder / "model-00001-of-00002.safetensors"))
    key = sorted(first)[0]
    second = load_file(str(folder / "model-00002-of-00002.safetensors"))
    second[key] = torch.zeros_like(first[key])
    save_file(second, str(folder / "model-00002-of-00002.safetensors"))
    with pytest.raises(ModelLoadError, match="two shards|both"):
        load_model(folder, device="cpu")


def test_index_naming_a_missing_shard(tmp_path, saved):
    folder, _ = _shard(saved, tmp_path / "s")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        load_model(folder, device="cpu")


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path, saved):
    folder = _copy(saved, tmp_path / "c")
    state = load_file(str(folder / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    good = tuple(state[key].shape)
    state[key] = torch.zeros(good[0] + 1, good[1])
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError) as e:
        load_model(folder, device="cpu")
    msg = str(e.value)
    assert "layers.0.mlp.up_proj.weight" in msg and str(good[0] + 1) in msg and str(good[0]) in msg
    assert "\n" not in msg and len(msg) < 600


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, saved, bad):
    folder = _copy(saved, tmp_path / "c")
    state = load_file(str(folder / "model.safetensors"))
    key = "model.layers.1.self_attn.k_proj.weight"
    state[key][0, 0] = bad
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"layers\.1\.self_attn\.k_proj\.weight.*(NaN|inf)"):
        load_model(folder, device="cpu")


# ============================================================ 5. names and corrupt files
@pytest.mark.parametrize("name", ["", "   "])
def test_empty_model_name(name):
    with pytest.raises(ModelLoadError, match="empty model name"):
        load_model(name, device="cpu")


def test_config_that_is_a_json_list(tmp_path, saved):
    folder = _copy(saved, tmp_path / "c")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json") as e:
        load_model(folder, device="cpu")
    assert "list" in str(e.value)


def test_config_that_is_not_json(tmp_path, saved):
    folder = _copy(saved, tmp_path / "c")
    (folder / "config.json").write_bytes(b"\xff\xfe{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_model(folder, device="cpu")


@pytest.mark.parametrize("cut", [4, 100, -50])
def test_truncated_safetensors(tmp_path, saved, cut):
    folder = _copy(saved, tmp_path / "c")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:cut])
    with pytest.raises(ModelLoadError, match="model.safetensors") as e:
        load_model(folder, device="cpu")
    assert "\n" not in str(e.value)
