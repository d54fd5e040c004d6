"""``ratelab`` command line: one subcommand per module in this package.

Each module exposes ``add_parser(subparsers)`` and ``run(args) -> int`` (``run(args, extra)`` for commands that set
``accepts_extra``: they take dotted options such as ``--task.eps 0.5``). Mistakes a user can make (bad paths,
unknown names, malformed options, diverged training) raise the library's own errors
(:class:`ratelab.core.errors.RatelabError`) and end in one clear line on stderr and a non-zero exit code;
``RATELAB_DEBUG=1`` shows their traceback. Any other exception is a bug and shows its full traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Order is the order shown in --help.
_COMMANDS = ("train", "eval", "measure", "models", "weights", "reproduce", "demo")


def build_parser() -> argparse.ArgumentParser:
    from ratelab import __version__

    parser = argparse.ArgumentParser(
        prog="ratelab",
        description="Build, train, measure and reproduce white-box / rate-reduction representation learning.",
        epilog="Run `ratelab COMMAND --help` for the options of a command. Multi-process: "
        "`torchrun --nproc_per_node=N -m ratelab train ...`.",
    )
    parser.add_argument("--version", action="version", version=f"ratelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"ratelab.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ratelab.core.errors import RatelabError, TrainingDiverged

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int((args.func(args, extra) if getattr(args, "accepts_extra", False) else args.func(args)) or 0)
    except KeyboardInterrupt:
        print("ratelab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`ratelab models | head`): stop quietly, as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except RatelabError as e:
        if os.environ.get("RATELAB_DEBUG"):
            raise
        print(f"ratelab {args.command}: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrainingDiverged) else 2


if __name__ == "__main__":
    raise SystemExit(main())
