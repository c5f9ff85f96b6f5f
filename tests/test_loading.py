"""load_model and config errors: one clear line naming the cause and the fix."""

import json
import os
import subprocess
import sys

import pytest
import torch

from llmopt_lab import ModelConfig, Transformer, load_model, preset, save_model
from llmopt_lab.errors import ConfigError, LlmoptError, ModelLoadError, UnsupportedDtypeError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    save_model(Transformer.from_config(preset("tiny"), seed=1), folder)
    return folder


def test_roundtrip(checkpoint):
    model, tok = load_model(checkpoint, device="cpu")
    ref = Transformer.from_config(preset("tiny"), seed=1)
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids))
    assert tok is None and model.dtype == torch.float32 and not model.training


def test_dtype_option(checkpoint):
    model, _ = load_model(checkpoint, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("name, match", [
    ("./does/not/exist", "does not exist"),
    ("/no/such/folder", "does not exist"),
    ("not-a-model", "not a zoo model"),
    ("some-org/some-model", "HF_HUB_OFFLINE"),
    ("synthetic:gpt-9", "unknown preset"),
])
def test_bad_names(name, match):
    with pytest.raises(ModelLoadError, match=match) as e:
        load_model(name, device="cpu")
    assert "\n" not in str(e.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path, checkpoint):
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_model(tmp_path)


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                      "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        load_model(tmp_path)


def test_unsupported_rope_scaling():
    d = preset("tiny").to_hf_dict()
    d["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    with pytest.raises(ConfigError, match="yarn"):
        ModelConfig.from_hf_dict(d)


def test_bad_dtype_and_device(checkpoint):
    with pytest.raises(UnsupportedDtypeError, match="unknown dtype"):
        load_model(checkpoint, dtype="float12")
    with pytest.raises(UnsupportedDtypeError, match="not supported"):
        load_model(checkpoint, dtype=torch.int8)
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            load_model(checkpoint, device="cuda")


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=3, num_kv_heads=2, hidden_size=96), "multiple of num_kv_heads"),
    (dict(hidden_size=100, num_heads=3, num_kv_heads=1), "not divisible"),
    (dict(hidden_act="gelu"), "silu"),
    (dict(vocab_size=0), "positive"),
])
def test_config_validation(kwargs, match):
    base = dict(vocab_size=10, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                num_kv_heads=2)
    base.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**base)


def test_weights_that_do_not_match_the_config(tmp_path, checkpoint):
    d = json.loads((checkpoint / "config.json").read_text())
    d["num_hidden_layers"] = 5
    (tmp_path / "config.json").write_text(json.dumps(d))
    (tmp_path / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="do not match"):
        load_model(tmp_path)


def test_synthetic_model_is_created_on_the_device_in_its_dtype():
    model, tok = load_model("synthetic:tiny", device="cpu", dtype="bfloat16")
    assert tok is None and model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == model.config.num_parameters()


@pytest.mark.parametrize("argv", [["generate", "./missing", "x"], ["generate", "nope/nada", "x"]])
def test_cli_prints_one_line_not_a_traceback(argv):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "llmopt_lab", *argv], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line
             and "warn" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_unknown_command():
    proc = subprocess.run([sys.executable, "-m", "llmopt_lab", "frobnicate"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown command" in proc.stderr


def test_all_errors_are_llmopt_errors():
    for cls in (ConfigError, ModelLoadError, UnsupportedDtypeError):
        assert issubclass(cls, LlmoptError)
