"""The corpus, its splits, the perplexity definition and the zoo's tokenizer."""

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmopt_lab import data
from llmopt_lab.config import ModelConfig
from llmopt_lab.model import Transformer
from llmopt_lab.zoo import TOKENIZER_DIR

ZOO = Path(os.environ.get("LLMOPT_TEST_ZOO", TOKENIZER_DIR.parent))


@pytest.fixture(scope="module")
def tok():
    folder = ZOO / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        pytest.skip(f"no tokenizer in {folder}: run `python -m llmopt_lab train-zoo --only tokenizer`")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


# ------------------------------------------------------------------ corpus
def _touch(root: Path, rel: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("x = 1\n")


def test_corpus_exclusions_on_a_fake_stdlib(tmp_path):
    keep = ["os.py", "json/decoder.py", "email/mime/text.py", "encodings/utf_8.py"]
    drop = ["site-packages/numpy/core.py", "dist-packages/foo.py", "test/test_os.py",
            "unittest/test/test_case.py", "ctypes/test/test_x.py", "lib2to3/tests/a.py",
            "idlelib/editor.py", "tkinter/ttk.py", "turtledemo/clock.py", "lib2to3/main.py",
            "ensurepip/__init__.py", "distutils/core.py", "__pycache__/os.py",
            "config-3.11-x86_64-linux-gnu/python-config.py",
            "_sysconfigdata__linux_x86_64-linux-gnu.py", "sitecustomize.py",
            "pydoc_data/topics.py", "turtle.py"]
    for rel in keep + drop:
        _touch(tmp_path, rel)
    (tmp_path / "README.txt").write_text("not python\n")
    assert data.corpus_files(tmp_path) == sorted(keep)


def test_corpus_on_this_machine():
    files = data.corpus_files()
    assert files == sorted(files) and len(files) > 300
    assert len(set(files)) == len(files)
    for f in files:
        parts = f.split("/")
        assert not set(parts) & {"site-packages", "dist-packages", "test", "tests", "idlelib",
                                 "tkinter", "__pycache__"}, f
        assert not parts[0].startswith(("config-", "_sysconfigdata")), f
    # the standard library only: a few MB, not the ~100+ MB of site-packages
    assert 3e6 < data.corpus_bytes(data.split_files("train")) < 25e6


def test_heldout_files_exist_and_stay_out_of_training():
    held = data.split_files("heldout")
    assert [p.relative_to(data.stdlib_dir()).as_posix() for p in held] == list(data.HELDOUT_FILES)
    train = {p.relative_to(data.stdlib_dir()).as_posix() for p in data.split_files("train")}
    valid = {p.relative_to(data.stdlib_dir()).as_posix() for p in data.split_files("valid")}
    assert not train & set(data.HELDOUT_FILES)
    assert not valid & set(data.HELDOUT_FILES)
    assert not train & valid
    assert train | valid | set(data.HELDOUT_FILES) == set(data.corpus_files())
    assert len(valid) >= 3


def test_split_is_a_stable_hash_of_the_path():
    for rel in ("os.py", "asyncio/tasks.py", "email/parser.py", "struct.py", "operator.py"):
        h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % 100
        assert data.split_of(rel) == ("valid" if h < data.VALID_PERCENT else "train")
    # fixed answers: a salted hash() would change them from one process to the next
    assert data.split_of("struct.py") == "valid" and data.split_of("operator.py") == "valid"
    assert data.split_of("os.py") == "train"
    assert data.split_of("textwrap.py") == "heldout"


def test_split_is_the_same_in_another_process():
    code = ("from llmopt_lab import data; "
            "print(sum(data.split_of(f) == 'valid' for f in data.corpus_files()))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert int(out) == sum(data.split_of(f) == "valid" for f in data.corpus_files())


def test_unknown_split_and_missing_root(tmp_path):
    with pytest.raises(data.CorpusError, match="unknown split"):
        data.split_files("test")
    with pytest.raises(data.CorpusError, match="does not exist"):
        data.corpus_files(tmp_path / "nowhere")
    with pytest.raises(data.CorpusError, match="held-out files missing"):
        data.split_files("heldout", root=tmp_path)


# -------------------------------------------------------------- perplexity
def test_file_windows():
    ids = list(range(1030))
    wins = data.file_windows(ids, 512)
    assert [len(w) for w in wins] == [512, 512, 6]
    assert sum(wins, []) == ids  # non-overlapping, nothing lost
    assert [len(w) for w in data.file_windows(list(range(1025)), 512)] == [512, 512]  # 1 token dropped
    picked = data.file_windows(list(range(10 * 512)), 512, max_windows=4)
    assert [w[0] // 512 for w in picked] == [0, 3, 6, 9]  # evenly spaced, first and last kept
    assert len(data.file_windows(list(range(3 * 512)), 512, max_windows=4)) == 3


def _tiny_model(vocab=64):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, max_position_embeddings=64)
    return Transformer.from_config(cfg, seed=1)


def test_evaluate_nll_matches_the_definition():
    model = _tiny_model()
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([16, 9, 2, 16, 5])
    ids = torch.randint(0, 64, (5, 16), generator=g)
    ids[torch.arange(16)[None] >= lengths[:, None]] = 0
    es = data.EvalSet(ids, lengths, 16, "toy")
    assert es.num_scored == int((lengths - 1).sum())
    # by hand: each window alone, every token after its first scored
    total = 0.0
    with torch.no_grad():
        for row, n in zip(ids, lengths.tolist()):
            logp = torch.log_softmax(model(row[None, :n]).float(), -1)[0]
            total -= float(logp[torch.arange(n - 1), row[1:n]].sum())
    expected = total / es.num_scored
    for bs in (1, 2, 8):
        r = data.evaluate_nll(model, es, batch_size=bs)
        assert r.tokens == es.num_scored
        assert r.nll == pytest.approx(expected, rel=1e-5)


def test_uniform_model_has_perplexity_vocab_size():
    model = _tiny_model(vocab=50)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.zeros(50, 32))
    es = data.EvalSet(torch.randint(0, 50, (3, 8)), torch.tensor([8, 8, 4]), 8, "toy")
    assert data.evaluate_nll(model, es).perplexity == pytest.approx(50.0, rel=1e-6)
    with pytest.raises(data.CorpusError, match="scores no tokens"):
        data.evaluate_nll(model, data.EvalSet(torch.zeros(1, 8, dtype=torch.long),
                                              torch.tensor([1]), 8, "empty"))


def test_heldout_set_sizes(tok):
    quick = data.heldout_set(tok, quick=True)
    full = data.heldout_set(tok, quick=False)
    assert quick.window == data.DEFAULT_WINDOW == quick.ids.shape[1]
    assert 20_000 <= quick.num_scored <= 60_000  # seconds on a CPU
    assert full.num_scored > quick.num_scored
    assert data.heldout_set(tok, quick=True) is quick  # cached
    n_files = len(data.HELDOUT_FILES)
    assert len(quick) <= n_files * data.QUICK_WINDOWS_PER_FILE


# --------------------------------------------------------------- tokenizer
def test_tokenizer_entries_and_eos(tok):
    assert len(tok) == 4096
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.pad_token_id == 0
    assert tok("def f():", add_special_tokens=True).input_ids == tok("def f():").input_ids
    assert 0 not in tok("def f():").input_ids  # no BOS/EOS added


TRICKY = [
    "def f(x):\n    if x:\n\treturn x  \n\n\n        # deep\n",
    "s = 'caf\u00e9 \u2603 \U0001f600'\r\nprint( s ) ; x=[ 1 ,2 ]\n",
    "    \n \t \n", "a\u00a0b", "class A :\n  pass\n# end without newline",
    "x = 'don't' + \"it ' s\" . strip ( )",
]


def test_tokenizer_round_trips_python_source(tok):
    for text in TRICKY:
        ids = tok(text).input_ids
        assert tok.decode(ids) == text
    chars = tokens = 0
    for path in data.split_files("heldout"):
        src = data.read_source(path)
        ids = tok(src).input_ids
        assert tok.decode(ids) == src, path.name
        chars, tokens = chars + len(src), tokens + len(ids)
    assert chars / tokens > 2.8  # BPE compresses code (about 3.3 characters per token)


@pytest.mark.parametrize("prompt, rest", [
    ("def f(x):\n", "    return x\n"),
    ("def f(x):\n    ", "return x\n"),
    ("class A:\n    def g(self):\n", "        pass\n"),
    ("x = 1\n\n", "y = 2\n"),
    ("if x:\n\t", "pass\n"),
])
def test_prompts_end_on_a_token_boundary(tok, prompt, rest):
    """A prompt ending in a newline or in indentation is tokenized as the same
    text is inside a longer file, so the model sees what it saw in training."""
    a = tok(prompt).input_ids
    assert tok(prompt + rest).input_ids[: len(a)] == a


def test_token_stream_separates_files(tok):
    files = data.split_files("heldout")[:3]
    stream = data.token_stream(tok, files, 0)
    per_file = data.encode_files(tok, files)
    assert stream.dtype == torch.long
    assert int((stream == 0).sum()) == 3 and len(stream) == sum(map(len, per_file)) + 3
    assert math.isclose(len(stream), sum(len(x) + 1 for x in per_file))
