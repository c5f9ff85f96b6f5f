"""``python -m llmopt_lab tour``: every lesson benchmark at a size that fits here."""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--size", default="auto", help="auto (default), quick, cpu or gpu")
    p.add_argument("--out", default=None, help="results folder (default: results/ of this checkout)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..benchmarks import BENCHMARKS

    return run_benchmarks(BENCHMARKS, args.device, args.size,
                          Path(args.out) if args.out else None, plot=not args.no_plot,
                          progress=not args.quiet)


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


def run_benchmarks(benchmarks, device, size: str, out: Path | None, plot: bool = True,
                   progress: bool = True) -> int:
    from .. import measure
    from ..benchmarks import resolve_size
    from ..weights import resolve_device

    dev = resolve_device(device)
    prov = measure.provenance(dev)
    print(f"{prov['device']} | torch {prov['torch']} | triton {prov['triton']} | "
          f"commit {prov['git_commit'][:12]}")
    for b in benchmarks:
        module = b.load()
        chosen = resolve_size(module, size, dev)
        result = module.run(chosen, dev, progress=progress)
        path = measure.save_result(f"{b.number}_{b.name}", result, root=out, device=dev)
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
