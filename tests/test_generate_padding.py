"""generate() with padded batches: an attention mask (or a tokenizer's output)
says which tokens are the prompt, so each row generates what it would alone."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from llmopt_lab import generate, load_model  # noqa: E402
from llmopt_lab.errors import GenerationError  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return load_model("llmopt-tiny", device="cpu")


PROMPTS = [[5, 17, 42, 99, 7, 13], [250, 31, 8], [64, 65, 66, 67]]


def _alone(model):
    return [generate(model, [p], max_new_tokens=5, ignore_eos=True).tokens[0].tolist() for p in PROMPTS]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_tensor_with_a_mask_equals_each_prompt_alone(tiny, side):
    model = tiny[0]
    T = max(len(p) for p in PROMPTS)
    ids = torch.full((len(PROMPTS), T), 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        sl = slice(0, len(p)) if side == "right" else slice(T - len(p), T)
        ids[i, sl], mask[i, sl] = torch.tensor(p), 1
    got = generate(model, ids, max_new_tokens=5, ignore_eos=True, attention_mask=mask).tokens.tolist()
    assert got == _alone(model)
    # without the mask the pads would be prompt: the short rows change
    unmasked = generate(model, ids, max_new_tokens=5, ignore_eos=True).tokens.tolist()
    assert unmasked != got


def test_a_tokenizers_padded_output_is_accepted(tiny):
    model, tok = tiny
    texts = ["def add(a, b):", "import os\nimport sys\n\nclass Config:"]
    tok.pad_token = tok.pad_token or tok.eos_token
    for side in ("right", "left"):
        tok.padding_side = side
        enc = tok(texts, padding=True, return_tensors="pt")
        got = generate(model, enc, max_new_tokens=6, ignore_eos=True).tokens.tolist()
        alone = [generate(model, [tok(t).input_ids], max_new_tokens=6, ignore_eos=True).tokens[0].tolist()
                 for t in texts]
        assert got == alone, side


@pytest.mark.parametrize("mask, match", [
    (torch.ones(2, 3), "does not match"),
    (torch.tensor([[1, 1, 1, 1], [1, 2, 1, 0]]), "only 0 and 1"),
    (torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]]), "has a hole"),
    (torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), "all zeros"),
])
def test_bad_masks_are_refused(tiny, mask, match):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with pytest.raises(GenerationError, match=match):
        generate(tiny[0], ids, max_new_tokens=2, attention_mask=mask)
