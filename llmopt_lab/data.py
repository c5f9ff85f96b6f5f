"""The course's corpus, its splits, and perplexity measured one exact way.

Corpus
    The Python standard library's own source, read from this machine (the
    folder ``sysconfig.get_paths()["stdlib"]``), so every machine with Python
    has it and nothing is downloaded or committed. Only the standard library
    counts: third-party code that lives in the same folder (site-packages,
    dist-packages) and anything that differs between machines or
    distributions is excluded (see :data:`EXCLUDED_DIRS` and
    :data:`EXCLUDED_FILES`; Debian splits the test suite, tkinter, idlelib,
    lib2to3 and distutils into separate packages, so a stock Debian Python
    lacks them). Files are listed in sorted order of their relative path.

Splits (by file, never inside a file)
    * ``"heldout"``: a fixed list of pure-Python modules present in every
      CPython 3.10-3.13 (Debian's split packages included), :data:`HELDOUT_FILES`.
      Every quality number of the course (perplexity before and after
      quantization, pruning, distillation) is measured on it.
    * ``"valid"``: about 2% of the other files, chosen by a stable hash of the
      relative path (SHA-256, not Python's salted ``hash()``), kept out of
      training as a second, machine-local check.
    * ``"train"``: the rest.

Perplexity (:func:`perplexity`), defined exactly
    Each held-out file is encoded on its own (no special tokens) and cut into
    consecutive non-overlapping windows of ``W`` tokens (the last one may be
    shorter; a window of one token is dropped). Within a window, every token
    after the first is scored given the tokens before it in the same window.
    The negative log-likelihoods of all scored tokens of all files are summed
    and divided by their number (a token-weighted mean, in nats); perplexity
    is ``exp`` of that mean. The *quick* set keeps at most
    :data:`QUICK_WINDOWS_PER_FILE` windows per file, evenly spaced through
    the file (first and last included), which is about 30k tokens and runs in
    seconds on a CPU; the *full* set keeps every window.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import LlmoptError
from .measure.metrics import perplexity_from_nll, token_nll


class CorpusError(LlmoptError, ValueError):
    """The corpus cannot be read as defined (a folder or held-out file is missing)."""


#: Folder names skipped anywhere in the tree: third-party code, test suites,
#: GUI code and tools that distributions package separately, build leftovers.
EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
    "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "distutils", "lib-dynload",
    "pydoc_data",  # pydoc's topic texts: one generated dict of prose, not code
})

#: Top-level files skipped: generated per machine, site hooks, distribution patches.
EXCLUDED_FILES = frozenset({
    "sitecustomize.py", "usercustomize.py", "_distutils_system_mod.py", "turtle.py",
    "this.py",  # ROT13-encoded text
})

#: Prefixes of excluded names: per-build configuration folders and data.
EXCLUDED_PREFIXES = ("config-", "_sysconfigdata")

#: The held-out evaluation files: pure-Python modules that every CPython
#: 3.10-3.13 ships in its core stdlib package (Debian's libpython3.X-stdlib too).
HELDOUT_FILES = (
    "bisect.py", "calendar.py", "colorsys.py", "fnmatch.py", "fractions.py", "getopt.py",
    "graphlib.py", "heapq.py", "html/parser.py", "json/decoder.py", "json/encoder.py",
    "queue.py", "reprlib.py", "sched.py", "shlex.py", "statistics.py", "textwrap.py",
)

#: Percent of the non-held-out files that go to the "valid" split (by SHA-256).
VALID_PERCENT = 2

#: Window length of the perplexity definition (the models' training length).
DEFAULT_WINDOW = 512

#: Windows per file in the quick held-out set.
QUICK_WINDOWS_PER_FILE = 4

SPLITS = ("train", "valid", "heldout")


def stdlib_dir() -> Path:
    """The folder of this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel_parts: Sequence[str]) -> bool:
    *dirs, name = rel_parts
    if any(d in EXCLUDED_DIRS or d.startswith(EXCLUDED_PREFIXES) for d in dirs):
        return True
    return name in EXCLUDED_FILES or name.startswith(EXCLUDED_PREFIXES)


def corpus_files(root: str | Path | None = None) -> list[str]:
    """Relative paths (POSIX style, sorted) of the corpus's ``.py`` files under
    ``root`` (default: :func:`stdlib_dir`). Raises CorpusError if root is not a folder."""
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise CorpusError(f"the standard library folder {root} does not exist")
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not _excluded(rel.parts) and path.is_file():
            out.append(rel.as_posix())
    return sorted(out)


def split_of(relpath: str) -> str:
    """``"heldout"``, ``"valid"`` or ``"train"`` for a corpus file's relative path.

    The valid split depends only on the path's SHA-256, so it is the same on
    every machine and every run (Python's ``hash()`` of a str is salted per process).
    """
    if relpath in HELDOUT_FILES:
        return "heldout"
    bucket = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big") % 100
    return "valid" if bucket < VALID_PERCENT else "train"


def split_files(split: str, root: str | Path | None = None) -> list[Path]:
    """Absolute paths of one split's files, in the corpus order.

    For ``"heldout"`` the order is :data:`HELDOUT_FILES`'s and a missing file
    raises CorpusError (numbers would not be comparable without it).
    """
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    root = Path(root) if root is not None else stdlib_dir()
    if split == "heldout":
        missing = [f for f in HELDOUT_FILES if not (root / f).is_file()]
        if missing:
            raise CorpusError(f"held-out files missing from {root}: {', '.join(missing)}")
        return [root / f for f in HELDOUT_FILES]
    return [root / f for f in corpus_files(root) if split_of(f) == split]


def read_source(path: str | Path) -> str:
    """A source file's text (UTF-8, as every stdlib file is; bad bytes replaced)."""
    return Path(path).read_bytes().decode("utf-8", errors="replace")


def corpus_bytes(files: Iterable[Path]) -> int:
    return sum(Path(f).stat().st_size for f in files)


def encode_files(tokenizer, files: Sequence[Path]) -> list[list[int]]:
    """Token ids of each file, encoded on its own without special tokens."""
    texts = [read_source(f) for f in files]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the fast path, and no warning about files longer than 2048 tokens
        return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def token_stream(tokenizer, files: Sequence[Path], separator_id: int) -> torch.Tensor:
    """All files as one (N,) int64 stream, each file preceded by ``separator_id``
    (the EOS token, so a model learns that a new file starts after it)."""
    parts = []
    for ids in encode_files(tokenizer, files):
        parts.append(torch.tensor([separator_id] + ids, dtype=torch.long))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


# --------------------------------------------------------------- perplexity
@dataclass
class EvalSet:
    """Windows to score: ids (N, W) int64 right-padded with 0, lengths (N,).

    Every token of a window after its first is scored, so the set scores
    ``sum(lengths - 1)`` tokens.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    window: int
    name: str

    @property
    def num_scored(self) -> int:
        return int((self.lengths - 1).sum())

    def __len__(self) -> int:
        return self.ids.shape[0]


def file_windows(ids: Sequence[int], window: int, max_windows: int | None = None) -> list[list[int]]:
    """Cut one file's tokens into non-overlapping windows of ``window`` tokens.

    The last window may be shorter; windows of fewer than 2 tokens score
    nothing and are dropped. ``max_windows`` keeps that many, evenly spaced
    (the first and the last always included).
    """
    wins = [list(ids[i:i + window]) for i in range(0, len(ids), window)]
    wins = [w for w in wins if len(w) >= 2]
    if max_windows is not None and len(wins) > max_windows:
        if max_windows == 1:
            keep = [0]
        else:
            keep = sorted({round(i * (len(wins) - 1) / (max_windows - 1)) for i in range(max_windows)})
        wins = [wins[i] for i in keep]
    return wins


_EVAL_CACHE: dict = {}


def _tokenizer_key(tokenizer) -> str:
    """A fingerprint of the tokenizer's content (not its id(), which Python reuses)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def heldout_set(tokenizer, quick: bool = True, window: int = DEFAULT_WINDOW,
                split: str = "heldout", root: str | Path | None = None) -> EvalSet:
    """The held-out windows of the perplexity definition (see the module doc).

    quick=True keeps :data:`QUICK_WINDOWS_PER_FILE` windows per file (about
    30k scored tokens); quick=False keeps all. The result is cached per
    tokenizer, so repeated evaluations do not re-encode.
    """
    key = (_tokenizer_key(tokenizer), quick, window, split, str(root))
    if key in _EVAL_CACHE:
        return _EVAL_CACHE[key]
    files = split_files(split, root)
    cap = QUICK_WINDOWS_PER_FILE if quick else None
    wins = [w for ids in encode_files(tokenizer, files) for w in file_windows(ids, window, cap)]
    ids = torch.zeros(len(wins), window, dtype=torch.long)
    for i, w in enumerate(wins):
        ids[i, : len(w)] = torch.tensor(w)
    lengths = torch.tensor([len(w) for w in wins], dtype=torch.long)
    result = EvalSet(ids, lengths, window, f"{split}-{'quick' if quick else 'full'}")
    _EVAL_CACHE[key] = result
    return result


@dataclass
class PerplexityResult:
    """nll: mean negative log-likelihood per scored token (nats); tokens: how many."""

    nll: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def bits_per_token(self) -> float:
        return self.nll / math.log(2)


@torch.inference_mode()
def evaluate_nll(model, evalset: EvalSet, batch_size: int = 8) -> PerplexityResult:
    """Token-weighted mean NLL of ``model`` over an :class:`EvalSet`.

    Windows are batched in their fixed order; padding sits after each
    window's real tokens, so under causal attention it changes nothing that
    is scored (it is masked out of the sum). Runs on the model's device.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    dev = model.device
    try:
        for start in range(0, len(evalset), batch_size):
            ids = evalset.ids[start:start + batch_size].to(dev)
            lengths = evalset.lengths[start:start + batch_size].to(dev)
            logits = model(ids)  # (B, W, V)
            targets = ids[:, 1:]
            steps = torch.arange(1, ids.shape[1], device=dev)
            mask = steps[None, :] < lengths[:, None]  # (B, W-1): real target tokens
            nll, n = token_nll(logits[:, :-1], targets, mask)
            total += nll
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise CorpusError(f"the evaluation set {evalset.name!r} scores no tokens")
    return PerplexityResult(total / count, count)


def perplexity(model, tokenizer, quick: bool = True, window: int = DEFAULT_WINDOW,
               batch_size: int = 8, split: str = "heldout") -> float:
    """Held-out perplexity of ``model`` as defined in this module's doc.

    quick=True: the ~30k-token set (seconds on a CPU); quick=False: every
    window of the held-out files.
    """
    result = evaluate_nll(model, heldout_set(tokenizer, quick, window, split), batch_size)
    return perplexity_from_nll(result.nll * result.tokens, result.tokens)
