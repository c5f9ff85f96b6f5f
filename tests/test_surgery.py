"""Module surgery (llmopt_lab.transforms.surgery): finding and replacing layers."""

import pytest
import torch.nn as nn

from llmopt_lab import Transformer, preset
from llmopt_lab.errors import LlmoptError, TransformError
from llmopt_lab.transforms import surgery as S
from llmopt_lab.transforms.quantize import Int8Linear


@pytest.fixture()
def tiny():
    return Transformer.from_config(preset("tiny"), seed=0)


def test_decoder_blocks_in_order(tiny):
    blocks = list(S.decoder_blocks(tiny))
    assert [i for i, _ in blocks] == list(range(tiny.config.num_layers))
    assert all(b is tiny.layers[i] for i, b in blocks)
    assert S.num_blocks(tiny) == tiny.config.num_layers


def test_decoder_linears_in_data_flow_order(tiny):
    lin = S.decoder_linears(tiny)
    L = tiny.config.num_layers
    assert len(lin) == 7 * L and "lm_head" not in lin
    assert list(lin)[:7] == [f"layers.0.{n}" for n in S.DECODER_LINEARS]
    assert lin["layers.1.mlp.down_proj"] is tiny.layers[1].mlp.down_proj
    with_head = S.decoder_linears(tiny, include_lm_head=True)
    assert list(with_head)[-1] == "lm_head" and with_head["lm_head"] is tiny.lm_head


def test_find_linears_by_pattern_and_type(tiny):
    refs = S.find_linears(tiny, "layers.*.mlp.*")
    assert [r.name for r in refs] == [f"layers.{i}.mlp.{n}" for i in range(tiny.config.num_layers)
                                      for n in ("gate_proj", "up_proj", "down_proj")]
    for r in refs:
        assert getattr(r.parent, r.attr) is r.module and isinstance(r.module, nn.Linear)
    # every nn.Linear: 7 per block plus the lm_head; embeddings are not linear layers
    assert len(S.find_linears(tiny)) == 7 * tiny.config.num_layers + 1
    qk = S.find_linears(tiny, ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj"])
    assert [r.attr for r in qk] == ["q_proj", "k_proj"]
    assert S.find_linears(tiny, "nothing.*") == []
    emb = S.find_modules(tiny, types=nn.Embedding)
    assert [r.name for r in emb] == ["embed_tokens"]


def test_replace_module_by_dotted_name(tiny):
    name = "layers.0.self_attn.o_proj"
    old = tiny.layers[0].self_attn.o_proj
    new = Int8Linear.from_linear(old)
    assert S.replace_module(tiny, name, new) is old
    assert tiny.layers[0].self_attn.o_proj is new
    # find_linears sees the replacement only when asked for its type
    assert name not in [r.name for r in S.find_linears(tiny)]
    assert [r.name for r in S.find_linears(tiny, types=Int8Linear)] == [name]
    head = nn.Linear(tiny.config.hidden_size, tiny.config.vocab_size, bias=False)
    S.replace_module(tiny, "lm_head", head)
    assert tiny.lm_head is head


def test_surgery_errors(tiny):
    with pytest.raises(TransformError, match="no submodule 'layers.0.self_attn.x_proj'"):
        S.replace_module(tiny, "layers.0.self_attn.x_proj", nn.Identity())
    with pytest.raises(TransformError, match="no submodule 'layers.99'"):
        S.replace_module(tiny, "layers.99.mlp", nn.Identity())
    with pytest.raises(TransformError, match="must be an nn.Module"):
        S.replace_module(tiny, "lm_head", "not a module")
    with pytest.raises(TransformError, match="no decoder blocks"):
        list(S.decoder_blocks(nn.Linear(2, 2)))
    with pytest.raises(TransformError, match="pattern"):
        S.find_modules(tiny, pattern=3)
    with pytest.raises(TransformError):
        S.parent_of(tiny, "")
    assert issubclass(TransformError, LlmoptError) and issubclass(TransformError, ValueError)
