"""``python -m llmopt_lab tour``: a first contact with the course in about a
minute (``--full``: every lesson's benchmark at a size that fits here).

The short tour measures this machine's limits, meets llmopt-tiny, places its
prefill and decode steps on this machine's roofline, serves a small load
with static and continuous batching, and ends with a real pretrained model
(SmolLM2-135M-Instruct, fetched once through pip) answering a question;
then it says where to go next.
Results of a learner's own runs go to ``my-results/`` (or ``--out``), never
over the committed ``results/`` unless that folder is asked for by name.
"""

from __future__ import annotations

from pathlib import Path


def next_steps() -> str:
    """The closing pointer: the lessons and the full benchmarks."""
    from ..benchmarks import BENCHMARKS

    lessons = ", ".join(b.number for b in BENCHMARKS)
    return ("next:\n"
            "  jupyter lab notebooks/                 the lessons, 00 first\n"
            f"  python -m llmopt_lab bench 01          one lesson's full benchmark ({lessons})\n"
            "  python -m llmopt_lab tour --full       every benchmark at this machine's size (minutes)")


def add_arguments(p) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--full", action="store_true",
                   help="run every lesson's benchmark instead of the short tour")
    p.add_argument("--size", default="auto",
                   help="with --full: auto (default), quick, cpu or gpu")
    p.add_argument("--out", default=None,
                   help="results folder (default: my-results/ of this checkout, with dated file "
                        "names so no earlier run is overwritten)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-real-model", action="store_true",
                   help="skip the last stage (SmolLM2-135M answers a question; fetched once, 93 MB)")


def run(args) -> int:
    from ..benchmarks import BENCHMARKS

    from ..errors import LlmoptError

    out = Path(args.out) if args.out else None
    if not args.full and args.size != "auto":
        raise LlmoptError(f"--size {args.size!r} applies to the benchmarks of `tour --full`; the short "
                          "tour has one size (add --full, or leave --size out)")
    if args.full:
        return run_benchmarks(BENCHMARKS, args.device, args.size, out, plot=not args.no_plot,
                              progress=not args.quiet)
    return first_contact(args.device, out, progress=not args.quiet,
                         real_model=not args.no_real_model)


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of summary rows (numbers to 3 significant digits)."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    text = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if i >= 2 else v.ljust(w) for i, (v, w) in
                        enumerate(zip(t, widths))) for t in text]
    return "\n".join(lines)


def _where(out: Path | None) -> tuple[Path, bool]:
    """(folder, stamp): the learner's folder with dated names by default; a
    folder given by name gets the plain names (``<lesson>.json``)."""
    from ..measure.results import user_results_root

    return (user_results_root(), True) if out is None else (out, False)


REAL_MODEL = "smollm2-135m"
REAL_QUESTION = "What is the capital of France?"


def real_answer(device, question: str = REAL_QUESTION, max_new_tokens: int = 24) -> dict:
    """SmolLM2-135M-Instruct's greedy answer to ``question`` through its chat
    template: ``{"answer", "seconds", "tokens"}``, or ``{"skipped": reason}``
    when the model cannot be loaded (not fetched and no registry: the reason
    names the command that fetches it)."""
    import time

    from ..errors import ModelLoadError
    from ..generate import generate
    from ..weights import load_model
    from .chat import encode_chat

    try:
        model, tok = load_model(REAL_MODEL, device=device)
    except ModelLoadError as e:
        return {"skipped": str(e)}
    ids = encode_chat(tok, [{"role": "user", "content": question}])
    t0 = time.perf_counter()
    out = generate(model, [ids], max_new_tokens).tolist()[0]
    return {"answer": tok.decode(out, skip_special_tokens=True).strip(),
            "seconds": time.perf_counter() - t0, "tokens": len(out)}


def first_contact(device=None, out: Path | None = None, progress: bool = True,
                  real_model: bool = True) -> int:
    """The short tour (about a minute on a 2-core CPU, plus the real model's
    one-time fetch); returns 0."""
    import time

    from tqdm.auto import tqdm

    from .. import measure
    from ..benchmarks.anatomy import measure_decode, measure_prefill
    from ..generate import generate
    from ..serving import Engine
    from ..serving.loadgen import corpus_tokens, make_requests, run_load
    from ..weights import load_model, resolve_device

    dev = resolve_device(device)
    prov = measure.provenance(dev)
    print(f"{prov['device']} | torch {prov['torch']} | triton {prov['triton']} | "
          f"commit {prov['git_commit'][:12]}")
    stages = ["this machine's limits", "llmopt-tiny", "a first answer", "prefill on the roofline",
              "decode, batch 1", "decode, batch 16", "serving 32 requests"]
    if real_model:
        stages.append("a real model: SmolLM2-135M")
    bar = tqdm(total=len(stages), desc="tour", disable=not progress, leave=False)

    def stage(i):
        bar.set_postfix_str(stages[i])

    stage(0)
    limits = measure.device_limits(dev)
    key = "fp32" if dev.type == "cpu" else "bf16"
    bar.update()
    stage(1)
    model, tok = load_model("llmopt-tiny", device=dev)
    bar.update()
    stage(2)
    prompt = "def fibonacci(n):\n"
    ids = tok(prompt, return_tensors="pt").input_ids.to(dev)
    generate(model, ids, max_new_tokens=4)  # warm-up
    t0 = time.perf_counter()
    answer = generate(model, ids, max_new_tokens=48).tolist()[0]
    gen_s = time.perf_counter() - t0
    bar.update()
    rows = []
    stage(3)
    rows.append(measure_prefill(model, 1, 128, limits, repeat=3))
    bar.update()
    stage(4)
    rows.append(measure_decode(model, 1, 128, limits, steps=16))
    bar.update()
    stage(5)
    rows.append(measure_decode(model, 16, 128, limits, steps=16))
    bar.update()
    stage(6)
    reqs = make_requests(32, prompt="uniform", output="longtail", seed=0, tokens=corpus_tokens(tok),
                         scale=0.06, max_len=model.config.max_position_embeddings)
    serving = {p: run_load(Engine(model, tok, policy=p, max_num_seqs=8), reqs)
               for p in ("static", "continuous")}
    bar.update()
    real = None
    if real_model:
        stage(7)
        real = real_answer(dev)
        bar.update()
    bar.close()

    print(f"\nthis machine: {limits.bandwidth / 1e9:.1f} GB/s memory bandwidth, "
          f"{limits.flops(key) / 1e9:.0f} GFLOP/s ({key}, {limits.source}); ridge point "
          f"{limits.ridge_point(key):.1f} FLOP/byte")
    print(f"\nllmopt-tiny ({model.config.num_parameters() / 1e6:.1f}M parameters), greedy, 48 tokens "
          f"in {gen_s:.2f} s ({48 / gen_s:.0f} tokens/s):")
    print("  " + (prompt + tok.decode(answer, skip_special_tokens=True)).replace("\n", "\n  ").rstrip())
    print("\non the roofline (lesson 01): the least time the limits allow, over the time measured")
    print(format_table([{"phase": r["phase"], "batch": r["batch"], "tokens": r["tokens"],
                         "ms": round(1e3 * r["time_s"], 2), "tokens/s": round(r["tokens_per_s"]),
                         "FLOP/byte": round(r["intensity"], 1),
                         "roofline %": round(100 * r["fraction"], 1)} for r in rows]))
    s, c = serving["static"], serving["continuous"]
    print(f"\nserving 32 requests, batch 8 (lesson 10): static batching {s['throughput_tok_s']:.0f} "
          f"tokens/s with {s['stats']['padding_tokens']} padding tokens; continuous batching "
          f"{c['throughput_tok_s']:.0f} tokens/s with none "
          f"({c['throughput_tok_s'] / s['throughput_tok_s']:.1f}x); same tokens: "
          f"{'yes' if s['outputs'] == c['outputs'] else 'NO'}")
    if real is not None and "answer" in real:
        print(f"\na real model (SmolLM2-135M-Instruct, 135M parameters, fetched once; lesson 00): "
              f"asked {REAL_QUESTION!r}, it answers in {real['seconds']:.1f} s:\n  {real['answer']}")
    elif real is not None:
        print(f"\na real model: skipped ({real['skipped']})")
    for r in serving.values():
        r.pop("outputs")
    folder, stamp = _where(out)
    path = measure.save_result("00_tour", dict(
        benchmark="tour", lesson="00", limits=limits.to_dict(), generate_tokens_per_s=48 / gen_s,
        answer=tok.decode(answer, skip_special_tokens=True), rows=rows, serving=serving,
        real_model=real),
        root=folder, device=dev, stamp=stamp)
    print(f"\nresults: {path}\n\n{next_steps()}")
    return 0


def run_benchmarks(benchmarks, device, size: str, out: Path | None, plot: bool = True,
                   progress: bool = True) -> int:
    """Run ``benchmarks`` and save each result: to ``out`` under its plain
    name, or (``out`` None) to the learner's folder with a dated name."""
    from .. import measure
    from ..benchmarks import resolve_size
    from ..weights import resolve_device

    dev = resolve_device(device)
    prov = measure.provenance(dev)
    print(f"{prov['device']} | torch {prov['torch']} | triton {prov['triton']} | "
          f"commit {prov['git_commit'][:12]}")
    folder, stamp = _where(out)
    for b in benchmarks:
        module = b.load()
        chosen = resolve_size(module, size, dev)
        started = measure.provenance(dev)  # the code that runs: a commit made meanwhile is not it
        result = module.run(chosen, dev, progress=progress)
        result.setdefault("provenance", started)
        # a special size (bench 03's "real", bench 10's "gpu-full") never replaces the usual result
        suffix = "" if chosen in ("quick", "cpu", "gpu") else f"-{chosen}"
        path = measure.save_result(f"{b.number}_{b.name}{suffix}", result, root=folder, device=dev,
                                   stamp=stamp)
        _report(b, module, result, prov, path, plot)
    return 0


def _report(b, module, result: dict, prov: dict, path: Path, plot: bool) -> None:
    """Print a result's summary (and draw its plot beside ``path``)."""
    print(f"\nLesson {b.number}: {b.title} [{result.get('size', '?')}]")
    print(format_table(module.summary_rows(result)))
    for m in result.get("models", []):
        if "profile" in m:
            print(f"\n{m['model']}: {m['profile']['summary']}")
    if hasattr(module, "summary_text"):  # the figures a table does not hold
        print("\n" + module.summary_text(result))
    print(f"\nresults: {path}")
    if plot and hasattr(module, "plot"):
        import matplotlib

        matplotlib.use("Agg")
        fig = module.plot(result, prov)
        png = path.with_suffix(".png")
        fig.savefig(png, dpi=120, bbox_inches="tight")
        print(f"plot:    {png}")


def show_result(b, path: Path, plot: bool = True) -> int:
    """Summary and plot of a stored result (nothing is measured)."""
    import json

    from ..errors import LlmoptError

    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LlmoptError(f"cannot read a stored result from {path}: {e}") from None
    if result.get("lesson") not in (None, b.number):
        raise LlmoptError(f"{path} holds lesson {result.get('lesson')}'s result, not lesson {b.number}'s")
    prov = result.get("provenance", {})
    print(f"{prov.get('device', '?')} | torch {prov.get('torch', '?')} | triton {prov.get('triton', '?')} | "
          f"commit {str(prov.get('git_commit', '?'))[:12]} | {prov.get('date', '?')}")
    _report(b, b.load(), result, prov, path, plot)
    return 0
