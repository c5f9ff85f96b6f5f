"""The command line: ``python -m llmopt_lab COMMAND ...``.

Each command lives in the module that owns the work and exposes two
functions, ``add_arguments(parser)`` and ``run(args) -> int``; only the chosen
command's module is imported (so ``--help`` is instant). Errors the user can
fix (:class:`~llmopt_lab.errors.LlmoptError`) print as one line, not a
traceback; so do arguments argparse refuses (exit status 2).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: command -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("llmopt_lab.commands.info", "device, versions, kernel mode and the device's limits"),
    "generate": ("llmopt_lab.commands.generate", "complete a prompt with a model (zoo name, folder or hub id)"),
    "chat": ("llmopt_lab.commands.chat", "chat with a model through its chat template, answers streamed"),
    "zoo": ("llmopt_lab.commands.zoo", "list the model zoo, fetch a pretrained model once (zoo fetch smollm2-135m)"),
    "serve": ("llmopt_lab.commands.serve", "serve a model over HTTP (OpenAI-compatible /v1/completions, streaming)"),
    "tour": ("llmopt_lab.commands.tour", "run every lesson's benchmark at a size that fits this device"),
    "bench": ("llmopt_lab.commands.bench", "run one lesson's benchmark (GPU-scale sizes available)"),
    "parallel": ("llmopt_lab.parallel.cli", "tensor, pipeline or data parallel generation (run it under torchrun)"),
    "exercises": ("llmopt_lab.course.exercises", "build exercises/ from solutions/ (or check they are current)"),
    "train-zoo": ("llmopt_lab.zoo.train", "train the built-in models (llmopt-tiny, llmopt-tiny-draft)"),
}


class _UsageError(Exception):
    """A command-line argument argparse refused (wrong type, missing, bad choice)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised (main prints them as one line) instead
    of a usage block and sys.exit(2)."""

    def error(self, message):
        raise _UsageError(f"{self.prog}: {message}")


def _top_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m llmopt_lab",
        description="llmopt-lab: the command line of the course on fast LLM inference.",
        epilog="Run `python -m llmopt_lab COMMAND --help` for a command's options.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m llmopt_lab`` with ``argv`` (default: sys.argv[1:]);
    returns the exit status: the command's own, 1 after a user error (an
    :class:`~llmopt_lab.errors.LlmoptError`, printed as one ``error:`` line
    on stderr), 2 for an unknown command or arguments argparse refuses (one
    line too), 130 when interrupted.

    Raises: nothing for a user's mistake; an exception that is not an
    LlmoptError (a bug) propagates with its traceback.
    """
    from .errors import LlmoptError

    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = _Parser(prog=f"python -m llmopt_lab {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    try:
        args = parser.parse_args(argv[1:])
    except _UsageError as e:
        print(f"error: {e} (see `python -m llmopt_lab {name} --help`)", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    try:
        return int(module.run(args) or 0)
    except LlmoptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
