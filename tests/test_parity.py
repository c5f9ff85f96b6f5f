"""Parity with Hugging Face transformers: random small checkpoints saved with
save_pretrained load through load_model and give the same logits (float32)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmopt_lab import ModelConfig, load_model  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = [
    # (architecture, num_heads, num_kv_heads, head_dim, tied, extra config)
    ("llama", 4, 4, 32, False, {}),                      # MHA (GQA ratio 1)
    ("llama", 4, 2, 32, True, {}),                       # ratio 2, tied
    ("llama", 4, 1, 64, False, {"rope_scaling": LLAMA3_SCALING}),  # ratio 4, Llama-3 RoPE
    ("llama", 2, 1, 64, False, {"attention_bias": True, "mlp_bias": True}),
    ("llama", 4, 2, 48, False, {}),                      # explicit head_dim != hidden/heads
    ("qwen2", 4, 2, 32, True, {}),                       # q/k/v bias, tied
    ("qwen2", 4, 1, 64, False, {}),
    ("mistral", 4, 2, 32, False, {"sliding_window": 7}),  # sliding window shorter than the input
    ("mistral", 8, 2, 16, False, {"sliding_window": None}),
]


def _hf_model(arch, heads, kv_heads, head_dim, tied, extra):
    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "mistral": transformers.MistralConfig}[arch]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "mistral": transformers.MistralForCausalLM}[arch]
    kw = dict(vocab_size=301, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
              max_position_embeddings=256, tie_word_embeddings=tied, rms_norm_eps=1e-6)
    kw.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in extra.items()})  # HF mutates dicts
    torch.manual_seed(1)
    model = model_cls(cfg_cls(**kw)).eval()
    with torch.no_grad():  # make biases and norms non-trivial so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-h{c[1]}kv{c[2]}d{c[3]}"
                         f"{'-tied' if c[4] else ''}{'-' + '-'.join(c[5]) if c[5] else ''}")
def test_logits_match_transformers(tmp_path, case):
    hf = _hf_model(*case)
    hf.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 301, (2, 24))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert expected.abs().max() > 0.1  # not a vacuous comparison
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_old_style_config_fixture(tmp_path):
    """The hand-written older config (rope_theta + rope_scaling with 'type')
    loads in both libraries and gives the same logits."""
    fixture = FIXTURES / "llama-old-style" / "config.json"
    d = json.loads(fixture.read_text())
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.tie_word_embeddings and cfg.num_kv_heads == 2
    hf_cfg = transformers.AutoConfig.from_pretrained(fixture.parent)
    torch.manual_seed(2)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    shutil.copy(fixture, tmp_path / "config.json")  # ours must read the old shape itself
    ours, _ = load_model(tmp_path, device="cpu")
    ids = torch.randint(0, 256, (1, 80))  # beyond original_max_position_embeddings
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_rope_parameters_and_rope_scaling_give_same_config():
    new = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
           "rope_parameters": dict(LLAMA3_SCALING, rope_theta=1234.0)}
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(rope_theta=1234.0, rope_scaling=dict(LLAMA3_SCALING))
    a, b = ModelConfig.from_hf_dict(new), ModelConfig.from_hf_dict(old)
    assert a == b and a.rope_theta == 1234.0 and a.rope_scaling["factor"] == 8.0


def test_our_saved_checkpoint_loads_in_transformers(tmp_path):
    from llmopt_lab import Transformer, preset, save_model

    ours = Transformer.from_config(preset("tiny"), seed=3)
    save_model(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)
