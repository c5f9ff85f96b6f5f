"""``python -m llmopt_lab train-zoo``: train the built-in models from scratch.

(Over 400 lines: the zoo's whole recipe, tokenizer to model cards, reads top to bottom
in one file; the training loop itself is :mod:`llmopt_lab.training`.)

What it does, in order (each stage can be run alone with ``--only``):

1. ``tokenizer``: a byte-level BPE tokenizer of :data:`VOCAB_SIZE` entries
   (``<|endoftext|>`` included: the EOS token and the file separator),
   trained with the ``tokenizers`` library on the training split of the
   corpus (:mod:`llmopt_lab.data`), saved so that transformers'
   ``AutoTokenizer.from_pretrained`` loads it offline.
2. ``teacher``: ``llmopt-tiny``, the fixed architecture :data:`TEACHER_CONFIG`,
   trained for a budget fixed in advance (:data:`TEACHER_SETTINGS`).
3. ``draft``: ``llmopt-tiny-draft``. Each candidate of :data:`DRAFT_CANDIDATES`
   is first trained briefly on the same data; the one with the best estimated
   speculative-decoding speed-up against the teacher (from its measured cost
   per token and greedy acceptance rate) is then trained on the full budget.

Everything is seeded and the data order is a function of the step (so an
interrupted run resumes with ``--resume`` and gives the same batches). Model
cards (README.md in each model folder) are generated from the measured
values that the run writes to ``training_log.json``.

The measurement helpers (:func:`decode_time_per_token`,
:func:`greedy_acceptance`, :func:`speculative_speedup`) are used by the
lessons too.
"""

from __future__ import annotations

import datetime
import json
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .. import data
from ..config import ModelConfig
from ..errors import LlmoptError
from ..generate import generate
from ..model import Transformer
from ..training import TrainSettings, autocast_plan, lm_loss, train
from ..weights import load_model, save_model
from . import DRAFT_NAME, TEACHER_NAME, ZOO_ROOT

VOCAB_SIZE = 4096

#: How text is cut before BPE merges (merges never cross these cuts). Every
#: newline is its own piece and a line's indentation another, so that a prompt
#: ending in "\n" or in its indentation ends on a token boundary that training
#: also had (GPT-2's pattern glues a newline to the next line's indentation: a
#: prompt "def f():\n" then ends in a token that, in training, was only ever
#: followed by unindented code). Identifiers keep their underscores and take
#: one leading space, as words do in GPT-2's pattern.
PRETOKENIZE_PATTERN = (r"\n|(?<=\n)[ \t]+|[^\S\n]?[\p{L}_][\p{L}\p{N}_]*|[^\S\n]?\p{N}+"
                       r"|[^\S\n]?[^\s\p{L}\p{N}_]+|[^\S\n]+")
EOS_TOKEN = "<|endoftext|>"
EOS_ID = 0  # the first special token gets id 0

#: The course's fixed architecture (issue 4): ~7.1M parameters.
TEACHER_CONFIG = ModelConfig(
    name=TEACHER_NAME, vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=768,
    num_layers=8, num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=True,
    max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
    eos_token_id=EOS_ID, torch_dtype="float32")

#: Draft candidates, each at most a fifth of the teacher's parameters.
DRAFT_CANDIDATES = {
    "a: 1 layer, hidden 192": TEACHER_CONFIG.replace(
        name=DRAFT_NAME, hidden_size=192, intermediate_size=512, num_layers=1, num_heads=3,
        num_kv_heads=1, head_dim=64),
    "b: 2 layers, hidden 128": TEACHER_CONFIG.replace(
        name=DRAFT_NAME, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=64),
}


#: 1000 steps x 16 x 512 = 8.2M tokens (about an hour on 2 CPU cores).
TEACHER_SETTINGS = TrainSettings(lr=2e-3)
#: Same token budget; the draft is several times cheaper per token.
DRAFT_SETTINGS = TrainSettings(lr=3e-3)
#: Brief training of each draft candidate, to choose between them.
SELECT_STEPS = 150

#: Speculation length assumed when ranking draft candidates.
SELECT_LOOKAHEAD = 4


# ---------------------------------------------------------------- tokenizer
def train_tokenizer(files, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer trained on ``files``, as a transformers tokenizer.

    Byte-level: every byte has a token, so any text (any indentation, tabs,
    non-ASCII) encodes and decodes back exactly. No normalizer, no prefix
    space, no BOS: ``decode(encode(text)) == text``. Pieces are cut by
    :data:`PRETOKENIZE_PATTERN` first.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((data.read_source(f) for f in files), trainer)
    if tok.token_to_id(EOS_TOKEN) != EOS_ID:  # pragma: no cover - tokenizers' convention
        raise LlmoptError(f"{EOS_TOKEN} did not get id {EOS_ID}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   clean_up_tokenization_spaces=False, model_max_length=2048)


def save_tokenizer(tokenizer, folder: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    Written by hand (not ``save_pretrained``) so that the config names the
    class every transformers version knows (``PreTrainedTokenizerFast``) and
    turns off the clean-up that would change spaces before punctuation.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}, indent=2) + "\n")
    return folder


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)  # the zoo ships no code


# --------------------------------------------------------------------- data
class Batches:
    """Training batches as a pure function of the step number.

    The training files form one token stream (each file preceded by EOS).
    Epoch e cuts it into pieces of seq_len + 1 tokens starting at offset
    ``(e * 173) % seq_len`` (so piece boundaries move between epochs) and
    visits them in a random order seeded by (seed, e).
    """

    def __init__(self, stream: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        self.stream, self.batch_size, self.seq_len, self.seed = stream, batch_size, seq_len, seed
        self.pieces = (len(stream) - seq_len) // (seq_len + 1)
        if self.pieces < batch_size:
            raise LlmoptError(f"the corpus ({len(stream)} tokens) is too small for one batch")
        self.steps_per_epoch = self.pieces // batch_size
        self._epoch, self._order = -1, None

    def __call__(self, step: int) -> torch.Tensor:
        """(batch_size, seq_len + 1) int64 tokens: inputs [:, :-1], targets [:, 1:]."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.pieces, generator=g)
        offset = (epoch * 173) % self.seq_len
        idx = self._order[i * self.batch_size:(i + 1) * self.batch_size]
        starts = offset + idx * (self.seq_len + 1)
        return torch.stack([self.stream[s:s + self.seq_len + 1] for s in starts.tolist()])


# ----------------------------------------------------------------- training
def auto_precision() -> str:
    """bf16 autocast where the CPU computes bfloat16 natively (AVX512-BF16 or
    AMX: about 1.6x faster training here), float32 elsewhere (emulated
    bfloat16 would be slower): :func:`llmopt_lab.training.autocast_plan` on the CPU."""
    return autocast_plan("auto", "cpu").precision


def train_model(config: ModelConfig, batches: Batches, evalset: data.EvalSet, s: TrainSettings,
                desc: str, checkpoint: Path | None = None, resume: bool = False):
    """Train a model from scratch (seeded) on the CPU with
    :func:`llmopt_lab.training.train`. Returns (model, log dict).

    The log holds the training loss (mean over each 10 steps), the quick
    held-out loss every ``s.eval_every`` steps and at the end, and the
    training time (evaluations excluded). ``checkpoint``: a file to save the
    state to at every evaluation, and to resume from when ``resume``.
    """
    torch.manual_seed(s.seed)
    model = Transformer.from_config(config, seed=s.seed).train()

    def heldout(m) -> dict:
        r = data.evaluate_nll(m, evalset)
        return {"loss": round(r.nll, 4), "perplexity": round(r.perplexity, 3)}

    log = train(model, batches, s, loss_fn=lm_loss, evaluate=heldout, checkpoint=checkpoint,
                resume=resume and checkpoint is not None, desc=desc)
    return model.eval(), log


# ------------------------------------------------------------ measurements
def decode_time_per_token(model, prompt_ids: torch.Tensor, new_tokens: int = 64,
                          repeats: int = 5) -> float:
    """Median seconds per generated token: static-cache greedy decoding,
    batch 1, EOS ignored (:func:`llmopt_lab.generate.generate`), after one warm-up."""
    prompt_ids = prompt_ids.reshape(1, -1).to(model.device)
    generate(model, prompt_ids, 4, ignore_eos=True)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(model, prompt_ids, new_tokens, use_cache=True, ignore_eos=True)
        times.append((time.perf_counter() - t0) / new_tokens)
    return statistics.median(times)


def cost_ratio(draft, target, prompt_ids: torch.Tensor, new_tokens: int = 64,
               rounds: int = 3) -> tuple[float, float, float]:
    """(draft s/token, target s/token, ratio): measured in alternating rounds
    so that a change in machine load affects both alike."""
    d, t = [], []
    for _ in range(rounds):
        d.append(decode_time_per_token(draft, prompt_ids, new_tokens))
        t.append(decode_time_per_token(target, prompt_ids, new_tokens))
    dm, tm = statistics.median(d), statistics.median(t)
    return dm, tm, dm / tm


def acceptance_prompts(evalset: data.EvalSet, prompt_len: int = 64, new_tokens: int = 32):
    """Prompts for :func:`greedy_acceptance`: the first ``prompt_len`` tokens of
    every window of the held-out set long enough to hold a continuation."""
    keep = evalset.lengths >= prompt_len + new_tokens
    return evalset.ids[keep, :prompt_len]


@torch.inference_mode()
def greedy_acceptance(target, draft, prompts: torch.Tensor, new_tokens: int = 32) -> float:
    """Teacher-forced greedy agreement of ``draft`` with ``target``.

    For each prompt (rows of ``prompts``, (P, T)), the target continues it
    greedily for ``new_tokens`` tokens; at every position of that
    continuation the draft's greedy next token, given the same prefix, is
    compared with the target's. Returns the fraction that agree: the
    acceptance rate of speculative decoding with one drafted token.
    """
    prompts = prompts.to(target.device)
    cont = generate(target, prompts, new_tokens, ignore_eos=True).tokens  # (P, N)
    seq = torch.cat([prompts, cont[:, :-1]], 1).to(draft.device)  # (P, T + N - 1)
    logits = draft(seq)[:, prompts.shape[1] - 1:]  # (P, N, V): predictions of cont
    return float((logits.argmax(-1) == cont.to(draft.device)).float().mean())


def speculative_speedup(acceptance: float, cost: float, k: int = SELECT_LOOKAHEAD) -> float:
    """Expected speed-up of speculative decoding with k drafted tokens per step.

    With each drafted token accepted independently with probability a, a
    step yields (1 - a^(k+1)) / (1 - a) tokens and costs k * cost + 1 target
    forwards (cost = draft time per token / target time per token).
    """
    a = min(acceptance, 1 - 1e-9)
    return (1 - a ** (k + 1)) / (1 - a) / (k * cost + 1)


@torch.inference_mode()
def hf_logits_check(folder: Path, model: Transformer, ids: torch.Tensor) -> float:
    """Max |logit difference| between transformers' model from ``folder`` and ours."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                              trust_remote_code=False).eval()
    return float((hf(ids).logits - model(ids)).abs().max())


def _device_description() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({name}), {torch.get_num_threads()} torch threads"


def _provenance() -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "device": _device_description(),
        "python": platform.python_version(),
        "python_minor": f"{sys.version_info.major}.{sys.version_info.minor}",
        "torch": torch.__version__,
    }


def _corpus_summary(tokenizer) -> dict:
    out = {"stdlib_dir": str(data.stdlib_dir()), "python": platform.python_version()}
    for split in data.SPLITS:
        files = data.split_files(split)
        out[split] = {"files": len(files), "bytes": data.corpus_bytes(files)}
    return out


# ------------------------------------------------------------------- stages
def stage_tokenizer(out: Path) -> dict:
    files = data.split_files("train")
    t0 = time.perf_counter()
    tok = train_tokenizer(files)
    folder = save_tokenizer(tok, out / "tokenizer")
    tok = load_tokenizer(folder)
    sample = data.read_source(data.split_files("heldout")[0])
    if tok.decode(tok(sample, add_special_tokens=False).input_ids) != sample:
        raise LlmoptError("the trained tokenizer does not round-trip the held-out source")
    print(f"tokenizer: {len(tok)} entries, trained on {len(files)} files in "
          f"{time.perf_counter() - t0:.1f} s -> {folder}")
    return {"vocab_size": len(tok)}


def _evaluate_final(model, tokenizer) -> dict:
    res = {}
    for name, quick, split in (("heldout_quick", True, "heldout"), ("heldout_full", False, "heldout"),
                               ("valid_full", False, "valid")):
        t0 = time.perf_counter()
        r = data.evaluate_nll(model, data.heldout_set(tokenizer, quick, split=split))
        res[name] = {"loss": round(r.nll, 4), "perplexity": round(r.perplexity, 3),
                     "tokens": r.tokens, "seconds": round(time.perf_counter() - t0, 1)}
    return res


def _save(model, tokenizer_dir: Path, folder: Path, log: dict) -> None:
    if folder.exists():
        for f in ("model.safetensors", "config.json"):
            (folder / f).unlink(missing_ok=True)
    save_model(model, folder, dtype=torch.float32)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / f, folder / f)
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": EOS_ID, "pad_token_id": EOS_ID}, indent=2) + "\n")
    (folder / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")


def stage_teacher(out: Path, settings: TrainSettings, work: Path, resume: bool) -> dict:
    tokenizer = load_tokenizer(out / "tokenizer")
    batches, evalset, corpus = _data(tokenizer, settings)
    model, log = train_model(TEACHER_CONFIG, batches, evalset, settings, TEACHER_NAME,
                             work / f"{TEACHER_NAME}.ckpt", resume)
    log.update(settings=asdict(settings), tokens_seen=settings.tokens,
               parameters=sum(p.numel() for p in model.parameters()),
               architecture=TEACHER_CONFIG.to_hf_dict(), corpus=corpus, **_provenance())
    log["final"] = _evaluate_final(model, tokenizer)
    folder = out / TEACHER_NAME
    _save(model, out / "tokenizer", folder, log)
    log["transformers_max_abs_diff"] = hf_logits_check(folder, model, evalset.ids[:2, :64])
    (folder / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"{TEACHER_NAME}: held-out loss {log['final']['heldout_quick']['loss']:.4f} "
          f"(perplexity {log['final']['heldout_quick']['perplexity']:.2f}, quick set), "
          f"{log['train_seconds'] / 60:.1f} min -> {folder}")
    return log


def _data(tokenizer, settings: TrainSettings):
    files = data.split_files("train")
    stream = data.token_stream(tokenizer, files, EOS_ID)
    corpus = _corpus_summary(tokenizer)
    corpus["train"]["tokens"] = int(len(stream))
    return (Batches(stream, settings.batch_size, settings.seq_len, settings.seed),
            data.heldout_set(tokenizer, quick=True), corpus)


def _pair_metrics(teacher, draft, evalset, prompt_ids) -> dict:
    acc = greedy_acceptance(teacher, draft, acceptance_prompts(evalset))
    d_s, t_s, ratio = cost_ratio(draft, teacher, prompt_ids)
    return {"acceptance": round(acc, 4), "draft_s_per_token": d_s, "teacher_s_per_token": t_s,
            "cost_ratio": round(ratio, 4),
            "speedup_estimate_k4": round(speculative_speedup(acc, ratio), 3)}


def stage_draft(out: Path, settings: TrainSettings, select_steps: int, work: Path,
                resume: bool, candidates: list[str] | None = None) -> dict:
    tokenizer = load_tokenizer(out / "tokenizer")
    batches, evalset, corpus = _data(tokenizer, settings)
    teacher_dir = out / TEACHER_NAME
    if not (teacher_dir / "config.json").exists():
        raise LlmoptError(f"train the teacher first: {teacher_dir} is missing")
    teacher, _ = load_model(teacher_dir, device="cpu")
    prompt_ids = evalset.ids[0, :32]
    names = candidates or list(DRAFT_CANDIDATES)
    selection = []
    if len(names) > 1:
        brief = replace(settings, steps=select_steps, eval_every=select_steps)
        for name in names:
            model, log = train_model(DRAFT_CANDIDATES[name], batches, evalset, brief,
                                     f"candidate {name[0]}")
            row = {"candidate": name, "parameters": sum(p.numel() for p in model.parameters()),
                   "steps": select_steps, "heldout_loss": log["heldout"][-1]["loss"],
                   "train_seconds": round(log["train_seconds"], 1),
                   **_pair_metrics(teacher, model, evalset, prompt_ids)}
            print(f"  {row}")
            selection.append(row)
        best = max(selection, key=lambda r: r["speedup_estimate_k4"])["candidate"]
    else:
        best = names[0]
    config = DRAFT_CANDIDATES[best]
    model, log = train_model(config, batches, evalset, settings, DRAFT_NAME,
                             work / f"{DRAFT_NAME}.ckpt", resume)
    log.update(settings=asdict(settings), tokens_seen=settings.tokens,
               parameters=sum(p.numel() for p in model.parameters()),
               teacher_parameters=sum(p.numel() for p in teacher.parameters()),
               architecture=config.to_hf_dict(), corpus=corpus, candidate=best,
               selection=selection, select_lookahead=SELECT_LOOKAHEAD, **_provenance())
    log["final"] = _evaluate_final(model, tokenizer)
    log["pair"] = _pair_metrics(teacher, model, evalset, prompt_ids)
    log["pair"]["measured"] = _provenance()
    folder = out / DRAFT_NAME
    _save(model, out / "tokenizer", folder, log)
    log["transformers_max_abs_diff"] = hf_logits_check(folder, model, evalset.ids[:2, :64])
    (folder / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    p = log["pair"]
    print(f"{DRAFT_NAME} ({best}): held-out loss {log['final']['heldout_quick']['loss']:.4f}, "
          f"acceptance {p['acceptance']:.3f}, cost ratio {p['cost_ratio']:.3f} -> {folder}")
    return log


def stage_pair(out: Path) -> dict:
    """Measure the draft against the teacher again (acceptance, cost ratio) on
    this machine and store the result in the draft's training log."""
    tokenizer = load_tokenizer(out / "tokenizer")
    evalset = data.heldout_set(tokenizer, quick=True)
    teacher, _ = load_model(out / TEACHER_NAME, device="cpu")
    draft, _ = load_model(out / DRAFT_NAME, device="cpu")
    path = out / DRAFT_NAME / "training_log.json"
    log = json.loads(path.read_text())
    log["pair"] = _pair_metrics(teacher, draft, evalset, evalset.ids[0, :32])
    log["pair"]["measured"] = _provenance()
    path.write_text(json.dumps(log, indent=1) + "\n")
    print(f"acceptance {log['pair']['acceptance']:.3f}, cost ratio {log['pair']['cost_ratio']:.3f}")
    return log


# -------------------------------------------------------------------- cards
def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _arch_lines(arch: dict) -> list[str]:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
            "max_position_embeddings", "rope_theta", "rms_norm_eps")
    return [f"| {k} | {arch[k]} |" for k in keys]


def _curve_table(log: dict) -> list[str]:
    rows = ["| step | tokens seen | held-out loss | perplexity |", "|---:|---:|---:|---:|"]
    for e in log["heldout"]:
        rows.append(f"| {e['step']} | {_fmt_int(e['tokens'])} | {e['loss']:.4f} | "
                    f"{e['perplexity']:.2f} |")
    return rows


def model_card(name: str, log: dict, other: dict | None, weights_bytes: int | None = None) -> str:
    """The README.md of a model folder, from its training log (measured values only)."""
    s, f, c = log["settings"], log["final"], log["corpus"]
    draft = name == DRAFT_NAME
    lines = [
        f"# {name}",
        "",
        ("The draft model of the llmopt-lab course: speculative decoding's draft for "
         "`llmopt-tiny` and the baseline student of distillation (trained on data, not "
         "distilled). Same tokenizer as the teacher." if draft else
         "The teacher and target model of the llmopt-lab course: a small Llama trained from "
         "scratch on the Python standard library's source, so it completes Python code."),
        "",
        "Generated by `python -m llmopt_lab train-zoo` from the values it measured "
        "(`training_log.json` holds them all). Load with `llmopt_lab.load_model("
        f"\"{name}\")` or `transformers.AutoModelForCausalLM.from_pretrained(<this folder>)`.",
        "",
        "## Architecture",
        "",
        f"Llama (`LlamaForCausalLM`), {_fmt_int(log['parameters'])} parameters "
        "(tied input/output embeddings), float32 weights"
        + (f" (`model.safetensors`: {weights_bytes / 1e6:.1f} MB)." if weights_bytes else "."),
        "",
        "| field | value |", "|---|---|", *_arch_lines(log["architecture"]),
        "",
        "## Training",
        "",
        f"- Corpus: the standard library of Python {c['python']} (this machine's "
        f"`{c['stdlib_dir']}`), site-packages, tests and distribution-specific parts excluded "
        f"(see `llmopt_lab/data.py`): {c['train']['files']} training files, "
        f"{_fmt_int(c['train']['bytes'])} bytes, {_fmt_int(c['train']['tokens'])} tokens; "
        f"{c['valid']['files']} validation files (SHA-256 split); "
        f"{c['heldout']['files']} held-out files (fixed list).",
        f"- Tokenizer: byte-level BPE, {log['architecture']['vocab_size']} entries, "
        "`<|endoftext|>` (id 0) = EOS and file separator.",
        f"- Budget fixed in advance: {s['steps']} steps x {s['batch_size']} sequences x "
        f"{s['seq_len']} tokens = {_fmt_int(log['tokens_seen'])} tokens "
        f"({log['tokens_seen'] / c['train']['tokens']:.1f} epochs).",
        f"- AdamW (betas {tuple(s['betas'])}, weight decay {s['weight_decay']} on matrices), "
        f"peak lr {s['lr']:g}, linear warm-up {max(1, round(s['warmup_frac'] * s['steps']))} "
        f"steps then cosine to {s['min_lr_ratio']:g} x peak, gradient clipping "
        f"{s['grad_clip']}, seed {s['seed']}; "
        + ("matmuls under bfloat16 autocast (float32 master weights, loss and evaluation "
           "in float32)." if s.get("precision") == "bf16" else "float32 throughout."),
        f"- Training time: {log['train_seconds'] / 60:.1f} min on {log['device']} "
        f"(torch {log['torch']}, Python {log['python']}), "
        f"{log['tokens_seen'] / log['train_seconds']:,.0f} tokens/s; date {log['date']}.",
        "",
        "## Quality",
        "",
        "Perplexity as defined in `llmopt_lab/data.py`: per file, non-overlapping windows "
        "of 512 tokens, every token after a window's first scored, token-weighted mean "
        "over all files.",
        "",
        "| set | scored tokens | loss (nats/token) | perplexity |", "|---|---:|---:|---:|",
    ]
    for key, label in (("heldout_quick", "held-out, quick (4 windows per file)"),
                       ("heldout_full", "held-out, full"), ("valid_full", "validation, full")):
        lines.append(f"| {label} | {_fmt_int(f[key]['tokens'])} | {f[key]['loss']:.4f} | "
                     f"{f[key]['perplexity']:.2f} |")
    lines += ["", f"transformers check: max |logit difference| with "
              f"`AutoModelForCausalLM` = {log['transformers_max_abs_diff']:.2e}.", ""]
    pair_log = log if draft else other
    if pair_log and "pair" in pair_log:
        p = pair_log["pair"]
        lines += [
            "## Draft against teacher" if draft else "## Its draft (llmopt-tiny-draft)",
            "",
            f"- Greedy acceptance rate (teacher-forced agreement on held-out prompts: the "
            f"fraction of positions of the teacher's greedy continuation where the draft's "
            f"greedy next token is the teacher's): **{p['acceptance']:.3f}**.",
            f"- Cost per decoded token (static-cache greedy decode, batch 1, "
            f"`llmopt_lab.generate.generate`): draft {p['draft_s_per_token'] * 1e3:.2f} ms, "
            f"teacher {p['teacher_s_per_token'] * 1e3:.2f} ms, ratio **{p['cost_ratio']:.3f}**"
            + (f" (measured {p['measured']['date']} on {p['measured']['device']})."
               if "measured" in p else "."),
            f"- Expected speed-up of speculative decoding with 4 drafted tokens (independent "
            f"acceptances): {p['speedup_estimate_k4']:.2f}x.",
            "",
        ]
    if draft and log.get("selection"):
        lines += [
            "### Why this architecture",
            "",
            f"Each candidate was trained for {log['selection'][0]['steps']} steps on the same "
            "data and measured against the teacher; the one with the highest expected "
            f"speculative speed-up (k = {log['select_lookahead']}) was then trained on the full "
            f"budget: **{log['candidate']}**.",
            "",
            "| candidate | parameters | held-out loss | acceptance | cost ratio | speed-up (k=4) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in log["selection"]:
            lines.append(f"| {r['candidate']} | {_fmt_int(r['parameters'])} | "
                         f"{r['heldout_loss']:.4f} | {r['acceptance']:.3f} | "
                         f"{r['cost_ratio']:.3f} | {r['speedup_estimate_k4']:.2f} |")
        lines.append("")
    lines += ["## Held-out loss during training (quick set)", "", *_curve_table(log), ""]
    return "\n".join(lines)


def write_cards(out: Path) -> None:
    logs = {}
    for name in (TEACHER_NAME, DRAFT_NAME):
        path = out / name / "training_log.json"
        if path.exists():
            logs[name] = json.loads(path.read_text())
    for name, log in logs.items():
        other = logs.get(DRAFT_NAME if name == TEACHER_NAME else TEACHER_NAME)
        weights = out / name / "model.safetensors"
        size = weights.stat().st_size if weights.exists() else None
        (out / name / "README.md").write_text(model_card(name, log, other, size))


# ---------------------------------------------------------------- command
def add_arguments(p) -> None:
    p.add_argument("--only", choices=["tokenizer", "teacher", "draft", "pair", "cards"],
                   default=None, help="run one stage (default: tokenizer, teacher, draft, cards; "
                   "'pair' measures the draft against the teacher again)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of teacher and draft (default: the fixed budget, 1000)")
    p.add_argument("--select-steps", type=int, default=SELECT_STEPS,
                   help="steps of the brief training of each draft candidate")
    p.add_argument("--candidate", choices=sorted({k[0] for k in DRAFT_CANDIDATES}), default=None,
                   help="skip the draft selection and train this candidate")
    p.add_argument("--out", type=Path, default=ZOO_ROOT,
                   help=f"folder of the zoo (default: {ZOO_ROOT})")
    p.add_argument("--work", type=Path, default=Path("runs/train-zoo"),
                   help="folder for resumable checkpoints (default: runs/train-zoo)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="training matmuls: bf16 autocast or fp32 (auto: bf16 where the CPU "
                        "has native bfloat16); weights are kept and saved in float32")


def run(args) -> int:
    torch.set_num_threads(args.threads)
    out: Path = args.out
    stages = [args.only] if args.only else ["tokenizer", "teacher", "draft", "cards"]
    precision = auto_precision() if args.precision == "auto" else args.precision
    teacher_s = replace(TEACHER_SETTINGS, precision=precision)
    draft_s = replace(DRAFT_SETTINGS, precision=precision)
    if args.steps is not None:
        if args.steps < 1:
            raise LlmoptError("--steps must be positive")
        every = min(teacher_s.eval_every, args.steps)
        teacher_s = replace(teacher_s, steps=args.steps, eval_every=every)
        draft_s = replace(draft_s, steps=args.steps, eval_every=every)
    print(f"train-zoo: {', '.join(stages)} -> {out} (corpus: Python {platform.python_version()} "
          f"stdlib at {data.stdlib_dir()}, {args.threads} threads, {precision} training)")
    if "tokenizer" in stages:
        stage_tokenizer(out)
    if "teacher" in stages:
        stage_teacher(out, teacher_s, args.work, args.resume)
    if "draft" in stages:
        cands = None
        if args.candidate:
            cands = [k for k in DRAFT_CANDIDATES if k[0] == args.candidate]
        stage_draft(out, draft_s, min(args.select_steps, draft_s.steps), args.work,
                    args.resume, cands)
    if "pair" in stages:
        stage_pair(out)
    write_cards(out)
    return 0
