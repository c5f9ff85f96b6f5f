"""``python -m llmopt_lab bench LESSON``: one lesson's benchmark."""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    from ..benchmarks import BENCHMARKS

    known = ", ".join(f"{b.number}/{b.name}" for b in BENCHMARKS)
    p.add_argument("lesson", help=f"lesson number or name ({known})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--size", default="auto",
                   help="auto (gpu on a GPU, else cpu), quick, cpu, or gpu (GPU-scale models)")
    p.add_argument("--out", default=None,
                   help="results folder: JSON goes to OUT/<device>/<lesson>.json, the plot beside "
                        "it (default: my-results/ of this checkout, with dated file names so no "
                        "earlier run is overwritten; '--out results' records into the committed "
                        "results/)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--show", metavar="JSON", default=None,
                   help="measure nothing: print the summary of a stored result and draw its plot "
                        "beside it (e.g. for results brought back from a GPU machine with --no-plot)")


def run(args) -> int:
    from ..benchmarks import find
    from .tour import run_benchmarks, show_result

    if args.show:
        return show_result(find(args.lesson), Path(args.show), plot=not args.no_plot)
    return run_benchmarks([find(args.lesson)], args.device, args.size,
                          Path(args.out) if args.out else None, plot=not args.no_plot,
                          progress=not args.quiet)
